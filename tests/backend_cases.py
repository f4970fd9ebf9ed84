"""LoRC graphs on a GPU backend against the CPU backend of the same library: the models, the
cases and the comparison shared by tests/test_vulkan.py and tools/gpu_check.py (CUDA).

Both sides run in one process from the same libllama: the device side with llama.cpp's defaults
(every layer and its cache on the first GPU device), the CPU side with ``n_gpu_layers=0`` and
``op_offload=False`` (every op on the CPU backend). Each case is a prompt of ``PROMPT`` tokens in
one ubatch followed by ``STEPS`` single-token decode steps (a prompt graph and decode graphs),
compared on every logits row. The scheduler's assignments (GGML_SCHED_DEBUG=2, read when a
context creates its scheduler) say which ops of each graph stayed on the CPU.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import synth
from lorc_gguf import convert
from lorc_gguf.runtime.session import Session, SessionParams

PROMPT, STEPS = 40, 6
SINKS, WINDOW = 4, 16
N_CTX = 256  # llama.cpp pads attended cells to 256: k = 8 selects among them (the selection path)
FEW = 8
VOCAB = 512  # synthetic vocabulary: a small output layer, no SmolLM2 file needed where it runs

# the qwen2 / gemma3 originals come from random HF models through the official converter, then get
# the synthetic vocabulary (synth.shrink_vocab); made where transformers is installed
ARCH_ORIGINALS = ("qwen2-original", "gemma3-swa-original", "gemma3-global-original")


def make_arch_originals(d: Path) -> dict[str, Path]:
    from lorc_gguf.converter.hf import convert_folder

    d.mkdir(parents=True, exist_ok=True)
    out = {}
    folder = synth.make_hf_qwen2_folder(d / "hf-qwen2", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, seed=4)
    out["qwen2-original"] = synth.shrink_vocab(convert_folder(folder, d / "qwen2-full.gguf"),
                                               d / "qwen2-original.gguf", VOCAB)
    for variant, window in (("swa", 16), ("global", None)):
        folder = synth.make_hf_gemma3_folder(d / f"hf-gemma3-{variant}", n_layer=6, n_embd=128, n_head=4,
                                             n_head_kv=2, head_dim=64, n_ff=256, sliding_window=window, seed=7)
        full = convert_folder(folder, d / f"gemma3-{variant}-full.gguf")
        out[f"gemma3-{variant}-original"] = synth.shrink_vocab(full, d / f"gemma3-{variant}-original.gguf", VOCAB)
    for p in d.iterdir():  # keep the small originals only
        if p.name.startswith("hf-"):
            shutil.rmtree(p)
        elif p.name.endswith("-full.gguf"):
            p.unlink()
    return out


def make_models(d: Path, arch_originals: dict[str, Path] | None = None) -> dict[str, Path]:
    """Every model the cases use, under ``d``; ``arch_originals`` (qwen2 / gemma3, from
    make_arch_originals) are made here when not given."""
    d.mkdir(parents=True, exist_ok=True)
    original = synth.make_llama_gguf(d / "original.gguf", n_layer=3, n_embd=256, n_head=8, n_head_kv=2,
                                     head_dim=64, n_ff=512, seed=5, vocab=VOCAB)
    out = {"original": original, **(arch_originals or make_arch_originals(d / "arch"))}
    common = dict(allocation="uniform", ratio=0.5, outtype="f32", progress=False, data_free=True)
    convert(original, d / "plain-wide.gguf", **dict(common, ratio=0.75))
    out["plain-wide"] = d / "plain-wide.gguf"
    for name, src, hybrid in (("plain", "original", False), ("hybrid", "original", True),
                              ("qwen2", "qwen2-original", True), ("gemma3-swa", "gemma3-swa-original", False),
                              ("gemma3-global", "gemma3-global-original", True),
                              ("gemma3-swa-hybrid", "gemma3-swa-original", True)):
        out[name] = d / f"{name}.gguf"
        extra = dict(sink_tokens=SINKS, recent_window=WINDOW) if hybrid else {}
        convert(out[src], out[name], **extra, **common)
    return out


PLAIN = dict(lorc_sink_tokens=0, lorc_recent_window=0)
HYBRID = dict(lorc_sink_tokens=SINKS, lorc_recent_window=WINDOW)
# name -> (model, settings); the dense cases are the original models, whose own CPU-vs-device
# difference sets the tolerance of the LoRC cases (DENSE_OF)
CASES: dict[str, tuple[str, dict]] = {
    "dense": ("original", {}),
    "dense-fa": ("original", dict(flash_attn=True)),
    "dense-q8_0": ("original", dict(cache_type_k="q8_0")),
    "latent": ("plain", {}),
    # value rank 64 = the key head width (flash attention kernels that need equal K and V widths
    # take it), and value rank 96 (wider: they do not)
    "latent-fa": ("plain", dict(flash_attn=True)),
    "latent-fa-wide": ("plain-wide", dict(flash_attn=True)),
    "latent-q8_0": ("plain", dict(cache_type_k="q8_0")),
    "hybrid": ("hybrid", HYBRID),
    "hybrid-blocks": ("hybrid", dict(HYBRID, lorc_prefill_block=16)),
    "top-k": ("plain", dict(lorc_top_k=FEW)),
    "hybrid-top-k": ("hybrid", dict(HYBRID, lorc_top_k=FEW)),
    "qwen2-dense": ("qwen2-original", {}),
    "qwen2-latent": ("qwen2", PLAIN),
    "qwen2-hybrid": ("qwen2", HYBRID),
    "gemma3-swa-dense": ("gemma3-swa-original", {}),
    "gemma3-swa-latent": ("gemma3-swa", {}),
    "gemma3-global-dense": ("gemma3-global-original", {}),
    "gemma3-global-hybrid": ("gemma3-global", HYBRID),
    # QK-norm selection (latent rows at unit key rms), and the exact window beside the sliding-window
    # layers' own store, with and without selection
    "gemma3-global-top-k": ("gemma3-global", dict(HYBRID, lorc_top_k=FEW)),
    "gemma3-swa-hybrid": ("gemma3-swa-hybrid", HYBRID),
    "gemma3-swa-hybrid-top-k": ("gemma3-swa-hybrid", dict(HYBRID, lorc_top_k=FEW)),
}
DENSE_OF = {"latent": "dense", "latent-fa": "dense-fa", "latent-fa-wide": "dense-fa", "latent-q8_0": "dense-q8_0", "hybrid": "dense",
            "hybrid-blocks": "dense", "top-k": "dense", "hybrid-top-k": "dense", "qwen2-latent": "qwen2-dense",
            "qwen2-hybrid": "qwen2-dense", "gemma3-swa-latent": "gemma3-swa-dense",
            "gemma3-global-hybrid": "gemma3-global-dense", "gemma3-global-top-k": "gemma3-global-dense",
            "gemma3-swa-hybrid": "gemma3-swa-dense", "gemma3-swa-hybrid-top-k": "gemma3-swa-dense"}
LORC_CASES = [c for c in CASES if c in DENSE_OF]
DENSE_CASES = [c for c in CASES if c not in DENSE_OF]

# The tolerance of a LoRC case: TOLERANCE_FACTOR times its dense model's own CPU-vs-device
# difference (same weights, cache type, prompt and attention kernel choice), and at least
# TOLERANCE_FLOOR. The LoRC graph adds a few matmuls (key rebuild, value lift) of the same widths
# as the dense ones and a RoPE of rebuilt keys, so its difference should be of the dense one's size;
# a factor 4 leaves room for those extra roundings. A wrong path is far above it: the plain latent
# cache in place of the exact window, or every key in place of the top-k selection, moves logits by
# several tenths of their range (distinct_paths).
TOLERANCE_FACTOR = 4.0
TOLERANCE_FLOOR = 1e-4


def prompt(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3 + 256, VOCAB, PROMPT + STEPS)]


# --- the llama.cpp log, captured while the scheduler prints its assignments -------------------

_LOG: list[str] = []


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _log_callback(level, text, user_data):  # pragma: no cover - called from C
    if text:
        _LOG.append(text.decode(errors="replace"))


def _capture_logs() -> None:
    import llama_cpp

    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


# node #  12 (   MUL_MAT):   name, 20 characters (size5) [BACK5 cause...]
_NODE = re.compile(r"node #\s*(\d+) \((.{10})\): (.{20}) \((.{5})\) \[(.{5}) ")
_SPLIT = re.compile(r"## SPLIT #(\d+): (\S+) # (\d+) inputs(.*)")


@dataclass
class GraphPlacement:
    splits: int = 0
    cpu_nodes: Counter = field(default_factory=Counter)  # (op, name with -N for the layer) -> count
    split_inputs: list[str] = field(default_factory=list)  # per split: "BACKEND: [input (size)] ..."


def parse_assignments(text: str) -> list[GraphPlacement]:
    """The scheduler's GGML_SCHED_DEBUG=2 output: one GraphPlacement per graph it split."""
    graphs: list[GraphPlacement] = []
    for line in text.splitlines():
        m = _SPLIT.search(line)
        if m:
            if m.group(1) == "0":
                graphs.append(GraphPlacement())
            graphs[-1].splits += 1
            graphs[-1].split_inputs.append(f"{m.group(2)}: {m.group(4).strip(': ')}")
            continue
        m = _NODE.search(line)
        if m and graphs and m.group(5).strip() == "CPU":
            name = re.sub(r"-\d+\b", "-N", m.group(3).strip())
            graphs[-1].cpu_nodes[(m.group(2).strip(), name)] += 1
    return graphs


def gpu_devices(lib_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the non-CPU devices of the ggml in ``lib_dir`` (after llama_cpp loaded it)."""
    ggml = ctypes.CDLL(str(Path(lib_dir) / "libggml.so"))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    devs = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    return [ggml.ggml_backend_dev_name(d).decode() for d in devs if ggml.ggml_backend_dev_type(d) != 0]


def run(path: Path, settings: dict, on_cpu: bool, debug: bool = False, n_threads: int | None = None
        ) -> tuple[np.ndarray, str]:
    """(logits of the prompt rows then one row per decode step, the scheduler's assignment log)."""
    placement = dict(n_gpu_layers=0, op_offload=False) if on_cpu else {}
    extra = {"n_threads": n_threads} if n_threads else {}
    params = SessionParams(n_ctx=N_CTX, n_batch=128, n_ubatch=128, **placement, **extra, **settings)
    tokens = prompt()
    _capture_logs()  # also keeps llama.cpp's log off the terminal
    if debug:
        os.environ["GGML_SCHED_DEBUG"] = "2"
    try:
        with Session(path, params) as s:
            _LOG.clear()  # the graphs reserved at context creation are not the ones run
            rows = [s.decode_seq(tokens[:PROMPT])]
            rows += [s.decode_seq([t], pos0=PROMPT + i) for i, t in enumerate(tokens[PROMPT:])]
            log = "".join(_LOG)
    finally:
        os.environ.pop("GGML_SCHED_DEBUG", None)
    return np.concatenate(rows), log


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over every logit, in units of the largest |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def cpu_ops(graphs: list[GraphPlacement]) -> set[tuple[str, str]]:
    return {key for g in graphs for key in g.cpu_nodes}


class Comparison:
    """Device-vs-CPU results per case, measured once."""

    def __init__(self, models: dict[str, Path], n_threads: int | None = None):
        self.models = models
        self.n_threads = n_threads
        self._results: dict[str, tuple[float, list[GraphPlacement]]] = {}

    def measure(self, case: str) -> tuple[float, list[GraphPlacement]]:
        if case not in self._results:
            model, settings = CASES[case]
            cpu, _ = run(self.models[model], settings, on_cpu=True, n_threads=self.n_threads)
            dev, log = run(self.models[model], settings, on_cpu=False, debug=True, n_threads=self.n_threads)
            self._results[case] = (rel_diff(dev, cpu), parse_assignments(log))
        return self._results[case]

    def tolerance(self, case: str) -> float:
        return max(TOLERANCE_FACTOR * self.measure(DENSE_OF[case])[0], TOLERANCE_FLOOR)

    def new_cpu_ops(self, case: str) -> set[tuple[str, str]]:
        """Ops the scheduler kept on the CPU in the case's graphs but not in its dense model's."""
        return cpu_ops(self.measure(case)[1]) - cpu_ops(self.measure(DENSE_OF[case])[1])

    def distinct_paths(self) -> dict[str, float]:
        """How far apart on the CPU the paths are that a wrong device graph could take instead."""
        m = self.models
        hybrid, _ = run(m["hybrid"], HYBRID, on_cpu=True, n_threads=self.n_threads)
        plain, _ = run(m["hybrid"], PLAIN, on_cpu=True, n_threads=self.n_threads)
        top_k, _ = run(m["plain"], dict(lorc_top_k=FEW), on_cpu=True, n_threads=self.n_threads)
        full, _ = run(m["plain"], {}, on_cpu=True, n_threads=self.n_threads)
        return {"hybrid vs plain latent": rel_diff(plain, hybrid), "top-k vs every key": rel_diff(top_k, full)}

    def table(self) -> list[dict]:
        rows = []
        for case, (model, settings) in CASES.items():
            diff, graphs = self.measure(case)
            rows.append(dict(case=case, model=model, settings=settings, max_rel_diff=diff,
                             tolerance=self.tolerance(case) if case in DENSE_OF else None,
                             ok=(diff <= self.tolerance(case)) if case in DENSE_OF else None,
                             splits=[g.splits for g in graphs[:1] + graphs[-1:]],
                             cpu_nodes_prompt=sorted(f"{op} {name} x{n}" for (op, name), n in
                                                     (graphs[0].cpu_nodes.items() if graphs else [])),
                             cpu_nodes_decode=sorted(f"{op} {name} x{n}" for (op, name), n in
                                                     (graphs[-1].cpu_nodes.items() if graphs else [])),
                             new_cpu_ops=sorted(" ".join(k) for k in self.new_cpu_ops(case)) if case in DENSE_OF else None,
                             decode_split_inputs=graphs[-1].split_inputs if graphs else []))
        return rows

    def markdown(self) -> str:
        lines = ["| case | model | settings | max rel. diff | tolerance | splits (prompt, decode) | "
                 "CPU nodes, prompt graph | CPU nodes, decode graph |", "|---|---|---|---:|---:|---|---|---|"]
        for r in self.table():
            tol = f"{r['tolerance']:.1e}" if r["tolerance"] is not None else "-"
            lines.append(f"| {r['case']} | {r['model']} | {r['settings'] or 'defaults'} | {r['max_rel_diff']:.2e} | "
                         f"{tol} | {', '.join(map(str, r['splits']))} | {'; '.join(r['cpu_nodes_prompt']) or 'none'} | "
                         f"{'; '.join(r['cpu_nodes_decode']) or 'none'} |")
        lines.append("")
        for r in self.table():
            lines.append(f"- {r['case']}, decode graph splits: " + " / ".join(r["decode_split_inputs"]))
        return "\n".join(lines)


if __name__ == "__main__":  # python tests/backend_cases.py Vulkan: is there such a device? (make test-vulkan)
    import sys

    import llama_cpp  # noqa: F401  (loads the library LLAMA_CPP_LIB_PATH names)

    want = sys.argv[1] if len(sys.argv) > 1 else "Vulkan"
    found = gpu_devices(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    if not any(d.startswith(want) for d in found):
        sys.exit(f"error: the runtime in {os.environ.get('LLAMA_CPP_LIB_PATH')} sees no {want} device "
                 f"(devices: {', '.join(found) or 'none'}); install a driver (e.g. mesa-vulkan-drivers for lavapipe) "
                 "and set GGML_VK_VISIBLE_DEVICES=0 for a CPU-type device")
    print(f"{want} devices: {', '.join(d for d in found if d.startswith(want))}")
