#!/usr/bin/env python3
"""`make demo`: convert the embedded SmolLM2 to a LoRC GGUF, chat with it through the patched
llama-cpp-python, and compare its KV cache with the original model's.

    python tools/demo.py [--ratio 0.5] [--out out/] [--prompt "..."]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorc_gguf import LorcError, convert, runtime  # noqa: E402
from lorc_gguf.models import smollm2_path  # noqa: E402
from lorc_gguf.session import Session, SessionParams, silence_llama_logs  # noqa: E402

DEFAULT_PROMPT = "In two sentences, what does a KV cache store in a transformer?"
PER_CELL = 12  # llama.cpp serializes pos, n_seq_id and a seq_id (int32 each) for every cell


def reply(path: Path, prompt: str, max_tokens: int) -> tuple[str, float]:
    llm = runtime.load(path, n_ctx=1024, seed=0)
    t0 = time.perf_counter()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                     max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["message"]["content"].strip(), time.perf_counter() - t0


def kv_bytes_per_token(path: Path) -> float:
    with Session(path, SessionParams(n_ctx=512)) as s:
        tokens = s.tokenize("The quick brown fox jumps over the lazy dog. " * 12)
        return s.kv_bytes_per_token(tokens[:128]) - PER_CELL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"), help="where the converted model goes")
    ap.add_argument("--ratio", type=float, default=0.5, help="kept fraction of the KV cache width")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=8192, help="context length for the cache-size line")
    args = ap.parse_args(argv)

    silence_llama_logs()
    try:
        runtime.require_patched_runtime()
        original = smollm2_path()
        args.out.mkdir(parents=True, exist_ok=True)
        lorc = args.out / f"SmolLM2-135M-Instruct.lorc-{args.ratio:g}.gguf"
        options = dict(allocation="progressive", ratio=args.ratio, progress=False)
        print(f"converting {original.name} (--progressive --ratio {args.ratio:g}) ...", flush=True)
        report = convert(original, lorc, **options)
        print(f"  wrote {lorc} in {report['elapsed_s']:.1f} s: method {report['method']}, "
              f"KV width kept {report['totals']['kv_width_fraction']:.3f}")
        print(f"  key ranks   {report['key_rank']}")
        print(f"  value ranks {report['value_rank']}\n")

        for name, path in (("original", original), ("LoRC", lorc)):
            text, secs = reply(path, args.prompt, args.max_tokens)
            print(f"[{name}] ({secs:.1f} s)\n{text}\n")

        dense, latent = kv_bytes_per_token(original), kv_bytes_per_token(lorc)
        mib = 1024 * 1024
        print("KV cache, measured from the runtime (f16 cache):")
        print(f"  original: {dense:8.0f} bytes/token  -> {dense * args.n_ctx / mib:7.1f} MiB at {args.n_ctx} tokens")
        print(f"  LoRC    : {latent:8.0f} bytes/token  -> {latent * args.n_ctx / mib:7.1f} MiB at {args.n_ctx} tokens"
              f"  ({latent / dense:.3f}x)")
    except (LorcError, runtime.RuntimeNotPatched) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
