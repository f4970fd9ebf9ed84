"""Tiny synthetic llama models shared by the converter and runtime tests.

``make_llama_gguf`` writes a GGUF that llama.cpp loads and runs: random weights, full llama
metadata, and the real SmolLM2 tokenizer (all ``tokenizer.*`` keys copied from the embedded
SmolLM2 GGUF, so the vocabulary is 49152 and ``token_embd`` has that many rows; the output
projection is tied to it, as in SmolLM2, to keep files small). ``spectra`` plants known singular
values in K/V. ``make_hf_llama_folder`` writes the same kind of model as a Hugging Face folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np

from lorc_gguf.format import keys as constants
from lorc_gguf.format.read import FastGGUFReader
from lorc_gguf.format.write import MetadataItem, copy_metadata
from lorc_gguf.models import smollm2_path

VOCAB_SIZE = 49152  # SmolLM2's, fixed by the copied tokenizer
CONTEXT_LENGTH = 2048
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType
DTYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

Spectra = Mapping[str, Sequence[Sequence[float] | None]]  # {"key": [per layer], "value": [...]}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_metadata() -> tuple[MetadataItem, ...]:
    """Every ``tokenizer.*`` key/value of the embedded SmolLM2 GGUF, types preserved."""
    reader = FastGGUFReader(smollm2_path(), "r")
    return tuple(item for item in copy_metadata(reader) if item.key.startswith("tokenizer."))


def synthetic_vocab_metadata(n_vocab: int) -> tuple[MetadataItem, ...]:
    """A SentencePiece-type ("llama") vocabulary of ``n_vocab`` made-up tokens: <unk>, <s>, </s>,
    the 256 byte tokens, then "t{i}". Models with it need no SmolLM2 GGUF (tools/gpu_check.py makes
    its models on machines without one) and have a small output layer; tests feed token ids."""
    if n_vocab < 259 + 1:
        raise ValueError("a synthetic vocabulary needs at least 260 tokens")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3, *([6] * 256), *([1] * (n_vocab - 259))]  # unknown, control, byte, normal
    return (MetadataItem("tokenizer.ggml.model", "llama", VT.STRING),
            MetadataItem("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
            MetadataItem("tokenizer.ggml.scores", [0.0] * n_vocab, VT.ARRAY, VT.FLOAT32),
            MetadataItem("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32),
            MetadataItem("tokenizer.ggml.unknown_token_id", 0, VT.UINT32),
            MetadataItem("tokenizer.ggml.bos_token_id", 1, VT.UINT32),
            MetadataItem("tokenizer.ggml.eos_token_id", 2, VT.UINT32))


def tokenizer_metadata(vocab: int | None) -> tuple[MetadataItem, ...]:
    """SmolLM2's tokenizer (vocab None) or a synthetic one of ``vocab`` tokens."""
    return smollm2_tokenizer_metadata() if vocab is None else synthetic_vocab_metadata(vocab)


def geometric_spectrum(width: int, kappa: float, top: float = 1.0) -> np.ndarray:
    """``width`` singular values falling geometrically from ``top`` to ``top / kappa``."""
    return top * np.power(float(kappa), -np.arange(width) / max(1, width - 1))


def planted_matrix(rng: np.random.Generator, rows: int, cols: int, singular_values: Sequence[float]) -> np.ndarray:
    """rows x cols matrix U diag(s) V^T with random orthonormal U, V and exactly the given s."""
    s = np.asarray(singular_values, dtype=np.float64)
    k = min(rows, cols)
    if s.shape != (k,):
        raise ValueError(f"need {k} singular values for a {rows}x{cols} matrix, got {s.shape}")
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return (u * s) @ v.T


def _gaussian(rng: np.random.Generator, rows: int, fan_in: int) -> np.ndarray:
    # N(0, 1/fan_in) entries keep activations O(1) through each projection
    return rng.standard_normal((rows, fan_in)) / np.sqrt(fan_in)


def _encode(a: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return a.astype(np.float32)
    if qtype == QT.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a.astype(np.float32), qtype)


def make_llama_gguf(path: str | os.PathLike[str], n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                    n_head_kv: int = 2, head_dim: int = 32, n_ff: int = 256, seed: int = 0, dtype: str = "f32",
                    spectra: Spectra | None = None, vocab: int | None = None) -> Path:
    """Write a random llama GGUF to ``path`` and return the path.

    ``dtype`` is the type of every 2-D weight (f32, f16, bf16, q8_0); norms stay f32 as llama.cpp
    expects. ``spectra={"key": [s_0, ..., s_{L-1}], "value": [...]}`` plants the singular values
    of layer l's K (or V) projection (``n_head_kv * head_dim`` values each; None keeps that layer
    random). ``vocab``: None for SmolLM2's tokenizer (49152 tokens), else a synthetic vocabulary of
    that many tokens (``synthetic_vocab_metadata``). Same arguments give byte-identical files.
    """
    path = Path(path)
    n_vocab = VOCAB_SIZE if vocab is None else vocab
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    qtype = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    d_kv = n_head_kv * head_dim
    planted = {side: list((spectra or {}).get(side) or [None] * n_layer) for side in ("key", "value")}
    for side, values in planted.items():
        if len(values) != n_layer:
            raise ValueError(f"spectra['{side}'] needs {n_layer} entries, got {len(values)}")

    arch = "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("synthetic-llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(FILE_TYPES[dtype])
    for item in tokenizer_metadata(vocab):
        writer.add_key_value(item.key, item.value, item.vtype, sub_type=item.sub_type)

    def weight(name: str, a: np.ndarray) -> None:
        data = _encode(a, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        writer.add_tensor(name, np.ones(n, dtype=np.float32))

    # numpy shapes are (out, in): ggml [in, out]
    weight("token_embd.weight", _gaussian(rng, n_vocab, n_embd))
    for il in range(n_layer):
        norm(f"blk.{il}.attn_norm.weight", n_embd)
        weight(f"blk.{il}.attn_q.weight", _gaussian(rng, n_head * head_dim, n_embd))
        for side, template in (("key", constants.TENSOR_K), ("value", constants.TENSOR_V)):
            s = planted[side][il]
            w = _gaussian(rng, d_kv, n_embd) if s is None else planted_matrix(rng, d_kv, n_embd, s)
            weight(template.format(bid=il), w)
        weight(f"blk.{il}.attn_output.weight", _gaussian(rng, n_embd, n_head * head_dim))
        norm(f"blk.{il}.ffn_norm.weight", n_embd)
        weight(f"blk.{il}.ffn_gate.weight", _gaussian(rng, n_ff, n_embd))
        weight(f"blk.{il}.ffn_up.weight", _gaussian(rng, n_ff, n_embd))
        weight(f"blk.{il}.ffn_down.weight", _gaussian(rng, n_embd, n_ff))
    norm("output_norm.weight", n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- real architectures' shapes, random quantized weights (tools/bench_convert.py) -----------------

# the attention and FFN sizes of models people convert; a file may keep fewer layers (n_layer=...)
# and a benchmark extrapolate per layer
REAL_SHAPES: dict[str, dict[str, int]] = {
    "llama-3.1-8b": dict(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336),
    "llama-3.1-70b": dict(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, head_dim=128, n_ff=28672),
    "llama-3.2-1b": dict(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, head_dim=64, n_ff=8192),
    "qwen2.5-7b-as-llama": dict(n_layer=28, n_embd=3584, n_head=28, n_head_kv=4, head_dim=128, n_ff=18944),
}


def _random_q4_0(rng: np.random.Generator, rows: int, fan_in: int) -> np.ndarray:
    """Q4_0 blocks of a (rows, fan_in) weight with N(0, 1/fan_in)-like entries: random 4-bit codes
    (uniform on -8..7, standard deviation 4.6) under one f16 scale, without a float matrix."""
    n_blocks = rows * fan_in // 32
    blocks = np.empty((n_blocks, 18), dtype=np.uint8)
    blocks[:, :2] = np.full(n_blocks, 1.0 / (4.6 * np.sqrt(fan_in)), dtype=np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    return blocks.reshape(rows, fan_in // 32 * 18)


def make_shaped_gguf(path: str | os.PathLike[str], shape: str = "llama-3.1-8b", n_layer: int | None = None,
                     seed: int = 0, vocab: int | None = None) -> Path:
    """A llama GGUF with a real model's shapes (``REAL_SHAPES``) and random Q4_0 weights (norms
    f32, SmolLM2's tokenizer or a synthetic one of ``vocab`` tokens), written one tensor at a time:
    memory stays at one tensor however large the model. Same arguments give byte-identical files."""
    from lorc_gguf.format.write import NewTensor, write_gguf

    dims = dict(REAL_SHAPES[shape])
    if n_layer is not None:
        dims["n_layer"] = n_layer
    L, E, H, HKV, D, F = (dims[k] for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff"))
    rng = np.random.default_rng(seed)
    arch = "llama"
    meta = [MetadataItem(k.format(arch=arch), v, t) for k, v, t in (
        (gguf.Keys.General.NAME, f"synthetic {shape}", VT.STRING),
        (gguf.Keys.LLM.BLOCK_COUNT, L, VT.UINT32), (gguf.Keys.LLM.CONTEXT_LENGTH, 131072, VT.UINT32),
        (gguf.Keys.LLM.EMBEDDING_LENGTH, E, VT.UINT32), (gguf.Keys.LLM.FEED_FORWARD_LENGTH, F, VT.UINT32),
        (gguf.Keys.Attention.HEAD_COUNT, H, VT.UINT32), (gguf.Keys.Attention.HEAD_COUNT_KV, HKV, VT.UINT32),
        (gguf.Keys.Attention.KEY_LENGTH, D, VT.UINT32), (gguf.Keys.Attention.VALUE_LENGTH, D, VT.UINT32),
        (gguf.Keys.Rope.DIMENSION_COUNT, D, VT.UINT32), (gguf.Keys.Rope.FREQ_BASE, 500000.0, VT.FLOAT32),
        (gguf.Keys.Attention.LAYERNORM_RMS_EPS, RMS_EPS, VT.FLOAT32),
        (gguf.Keys.LLM.VOCAB_SIZE, VOCAB_SIZE if vocab is None else vocab, VT.UINT32),
        (gguf.Keys.General.FILE_TYPE, int(gguf.LlamaFileType.MOSTLY_Q4_0), VT.UINT32))]
    meta += list(tokenizer_metadata(vocab))

    def q4(name: str, rows: int, fan_in: int) -> NewTensor:
        return NewTensor(name, (rows, fan_in), QT.Q4_0, lambda: _random_q4_0(rng, rows, fan_in))

    def ones(name: str) -> NewTensor:
        return NewTensor(name, (1, E), QT.F32, lambda: np.ones((1, E), dtype=np.float32))

    plan = [q4("token_embd.weight", VOCAB_SIZE if vocab is None else vocab, E)]
    for il in range(L):
        plan += [ones(f"blk.{il}.attn_norm.weight"), q4(f"blk.{il}.attn_q.weight", H * D, E),
                 q4(constants.TENSOR_K.format(bid=il), HKV * D, E), q4(constants.TENSOR_V.format(bid=il), HKV * D, E),
                 q4(f"blk.{il}.attn_output.weight", E, H * D), ones(f"blk.{il}.ffn_norm.weight"),
                 q4(f"blk.{il}.ffn_gate.weight", F, E), q4(f"blk.{il}.ffn_up.weight", F, E),
                 q4(f"blk.{il}.ffn_down.weight", E, F)]
    plan.append(ones("output_norm.weight"))
    write_gguf(Path(path), arch, meta, plan, progress=False)
    return Path(path)


# --- Hugging Face folders ----------------------------------------------------------------------

def _tokenizer_cache_dir() -> Path:
    """Where the HF tokenizer derived from SmolLM2's GGUF is kept between runs (building it with
    transformers takes ~15 s). Keyed by the GGUF's size and the transformers version."""
    import transformers

    from lorc_gguf.runtime import sdist

    model = smollm2_path()
    key = hashlib.sha256(f"{model.stat().st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    return sdist.cache_dir() / f"smollm2-hf-tokenizer-{key}"


def smollm2_hf_tokenizer_dir() -> Path:
    """A folder with SmolLM2's tokenizer in HF format, built from the GGUF by transformers."""
    dest = _tokenizer_cache_dir()
    if (dest / ".complete").exists():
        return dest
    from transformers import AutoTokenizer

    model = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        tok.save_pretrained(tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _save_with_smollm2_tokenizer(model, path: Path) -> None:
    """``save_pretrained`` (safetensors) into ``path`` plus SmolLM2's tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    for item in smollm2_hf_tokenizer_dir().iterdir():
        if item.name != ".complete":
            shutil.copy2(item, path / item.name)


def _update_config(path: Path, **values) -> None:
    """Set keys of a saved folder's config.json (what transformers wrote is kept otherwise)."""
    config_path = path / "config.json"
    cfg = json.loads(config_path.read_text())
    cfg.update(values)
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_hf_llama_folder(path: str | os.PathLike[str], n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                         n_head_kv: int = 2, head_dim: int = 32, n_ff: int = 256, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (safetensors) with SmolLM2's tokenizer, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=n_embd, intermediate_size=n_ff,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head_kv,
                         head_dim=head_dim, max_position_embeddings=CONTEXT_LENGTH, rms_norm_eps=RMS_EPS,
                         rope_theta=ROPE_FREQ_BASE, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    _save_with_smollm2_tokenizer(model, path)
    return path


def make_hf_gemma3_folder(path: str | os.PathLike[str], n_layer: int = 6, n_embd: int = 128, n_head: int = 4,
                          n_head_kv: int = 2, head_dim: int = 64, n_ff: int = 256, sliding_window: int | None = 16,
                          seed: int = 0) -> Path:
    """A random Gemma3ForCausalLM (text only, safetensors) with SmolLM2's tokenizer: QK-norm, GELU
    FFN, four norms per layer. With ``sliding_window`` every sixth layer is global and the others
    attend a window (the pattern the pinned converter and llama.cpp assume); None makes every layer
    global (``sliding_window_pattern`` 1, no window written). The norm gains are drawn at random:
    transformers initialises them to zero (a gain of one), which would hide a key norm the latent
    path drops or applies before the up-projection."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = Path(path)
    torch.manual_seed(seed)
    swa = sliding_window is not None
    layer_types = [("full_attention" if not swa or (il + 1) % 6 == 0 else "sliding_attention") for il in range(n_layer)]
    config = Gemma3TextConfig(vocab_size=VOCAB_SIZE, hidden_size=n_embd, intermediate_size=n_ff,
                              num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head_kv,
                              head_dim=head_dim, max_position_embeddings=CONTEXT_LENGTH, rms_norm_eps=RMS_EPS,
                              sliding_window=sliding_window or CONTEXT_LENGTH, layer_types=layer_types,
                              query_pre_attn_scalar=head_dim, final_logit_softcapping=None,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    _save_with_smollm2_tokenizer(model, path)
    if not swa:
        _update_config(path, sliding_window_pattern=1)  # what the pinned converter reads to leave the window out
    return path


def make_hf_qwen2_folder(path: str | os.PathLike[str], n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                         n_head_kv: int = 2, n_ff: int = 256, seed: int = 0) -> Path:
    """A random Qwen2ForCausalLM (safetensors) with SmolLM2's tokenizer, saved to ``path``: Q/K/V
    biases drawn at random (transformers initialises them to zero, which would hide a bias that the
    latent path drops), untied output."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=n_embd, intermediate_size=n_ff,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head_kv,
                         max_position_embeddings=CONTEXT_LENGTH, rms_norm_eps=RMS_EPS, rope_theta=ROPE_FREQ_BASE,
                         tie_word_embeddings=False, use_sliding_window=False, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    _save_with_smollm2_tokenizer(model, path)
    # transformers 5 loads any model_type "qwen2" folder's tokenizer as Qwen2Tokenizer, whose own
    # pre-tokenizer turns SmolLM2's vocabulary into a hash the pinned converter does not know (a real
    # Qwen2 folder has Qwen's tokenizer and hashes as "qwen2"). model_type only steers AutoTokenizer:
    # the converter picks its Qwen2 class from "architectures", which stays Qwen2ForCausalLM.
    _update_config(path, model_type="llama")
    return path


def shrink_vocab(src: str | os.PathLike[str], dst: str | os.PathLike[str], vocab: int) -> Path:
    """``src`` with a synthetic vocabulary of ``vocab`` tokens: the first ``vocab`` rows of
    token_embd (and of output, where untied), every other tensor and key copied. Makes the
    converted qwen2 / gemma3 models small enough to travel to a machine without transformers
    (tools/gpu_check.py)."""
    from lorc_gguf.format.write import CopiedTensor, NewTensor, write_gguf

    reader = FastGGUFReader(Path(src), "r")
    arch = bytes(reader.fields[gguf.Keys.General.ARCHITECTURE].parts[-1]).decode()
    skip = {f.name for f in reader.fields.values() if f.name.startswith("tokenizer.")}
    skip.add(gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch))
    meta = [*copy_metadata(reader, skip=skip), *synthetic_vocab_metadata(vocab)]
    plan = []
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight"):
            rows = np.asarray(t.data)[:vocab].copy()
            plan.append(NewTensor(t.name, (vocab, int(t.shape[0])), QT(t.tensor_type), lambda r=rows: r))
        else:
            plan.append(CopiedTensor(t))
    write_gguf(Path(dst), arch, meta, plan, progress=False)
    return Path(dst)
