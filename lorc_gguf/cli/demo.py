"""`make demo`: convert the embedded SmolLM2 to a LoRC GGUF, chat with it through the patched
llama-cpp-python, and compare its KV cache with the original model's.

It converts with the converter's defaults, exactly what `tools/convert.py MODEL OUT.gguf` writes:
calibrated on the built-in text (whitened SVD), progressive ranks, exact sinks and recent window.
--data-free converts with the paper's data-free SVD and progressive rule instead, to see why that
is not the default.

    python tools/demo.py [--ratio 0.5] [--data-free] [--out out/] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from .. import runtime
from ..converter.pipeline import convert
from ..errors import LorcError
from ..evaluation.kv import CELL_METADATA_BYTES
from ..models import smollm2_path
from ..runtime.library import silence_llama_logs
from ..runtime.session import Session, SessionParams
from .common import fail

# long enough (~200 tokens) that part of it leaves the exact window of 128 tokens and is attended
# through the latent cache
DEFAULT_PROMPT = (
    "Read this note and answer the question after it.\n\n"
    "Note: The lighthouse on Gull Island was built in 1871 from granite quarried on the mainland. "
    "Its first keeper, Martha Reyes, kept a log of every ship that passed, and her log shows that "
    "the busiest year was 1893, when 412 ships were recorded. The lamp was converted from oil to "
    "electricity in 1921, and the last keeper left in 1968, when the light was automated. Today the "
    "island is a bird sanctuary, and visitors may land only in August, when the puffin chicks have "
    "left their burrows. The granite tower is 31 metres tall and is painted with a single red band.\n\n"
    "Question: Who was the first keeper, and in which year were the most ships recorded?")


def reply(path: Path, prompt: str, max_tokens: int) -> tuple[str, float]:
    llm = runtime.load(path, n_ctx=1024, seed=0)
    t0 = time.perf_counter()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                     max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["message"]["content"].strip(), time.perf_counter() - t0


def kv_bytes(path: Path, n_ctx: int) -> tuple[float, float]:
    """(bytes per token, bytes of a sequence of n_ctx tokens), from the serialized sequence state:
    its growth per token, and what a 512-token sequence holds beyond that (the hybrid cache's
    exact sink and window cells, headers), which stays constant as the sequence grows."""
    with Session(path, SessionParams(n_ctx=1024)) as s:
        tokens = s.tokenize("The quick brown fox jumps over the lazy dog. " * 60)[:512]
        per_token = s.kv_bytes_per_token(tokens) - CELL_METADATA_BYTES
        s.decode_seq(tokens, logits=False)
        fixed = s.seq_state_size(0) - len(tokens) * per_token
        return per_token, per_token * n_ctx + fixed


def demo_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"), help="where the converted model goes")
    ap.add_argument("--ratio", type=float, default=0.5, help="kept fraction of the KV cache width")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=8192, help="context length for the cache-size line")
    ap.add_argument("--data-free", action="store_true", help="the paper's data-free SVD, progressive rule")
    args = ap.parse_args(argv)

    silence_llama_logs()
    try:
        runtime.require_patched_runtime()
        original = smollm2_path()
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "data-free" if args.data_free else "default"
        flags = f"--ratio {args.ratio:g}" + (" --data-free" if args.data_free else "")
        lorc = args.out / f"SmolLM2-135M-Instruct.lorc-{tag}-{args.ratio:g}.gguf"
        print(f"converting {original.name} (tools/convert.py MODEL OUT {flags}; a minute or two) ...", flush=True)
        report = convert(original, lorc, ratio=args.ratio, data_free=args.data_free, progress=False)
        print(f"  wrote {lorc} in {report['elapsed_s']:.1f} s: method {report['method']}, "
              f"KV width kept {report['totals']['kv_width_fraction']:.3f}")
        print(f"  key ranks   {report['key_rank']}")
        print(f"  value ranks {report['value_rank']}\n")

        for name, path in (("original", original), ("LoRC", lorc)):
            text, secs = reply(path, args.prompt, args.max_tokens)
            print(f"[{name}] ({secs:.1f} s)\n{text}\n")

        (dense, dense_total), (latent, latent_total) = kv_bytes(original, args.n_ctx), kv_bytes(lorc, args.n_ctx)
        mib = 1024 * 1024
        print("KV cache of one sequence, measured from the runtime (f16 cache):")
        print(f"  original: {dense:8.0f} bytes/token  -> {dense_total / mib:7.1f} MiB at {args.n_ctx} tokens")
        print(f"  LoRC    : {latent:8.0f} bytes/token  -> {latent_total / mib:7.1f} MiB at {args.n_ctx} tokens"
              f"  ({latent_total / dense_total:.3f}x, exact sink/window cells included)")
    except (LorcError, runtime.RuntimeNotPatched) as e:
        return fail(str(e))
    return 0
