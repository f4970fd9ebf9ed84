"""Greedy replies of two models to the same chat prompts, and their token agreement
(``tools/compare.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import LorcError
from ..runtime.decoding import chat_prompt, generate_greedy, tokenize_chat
from .configs import ModelConfig, default_threads, open_session
from .machine import versions


DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a beginner.",
    "List three tips for staying focused while studying.",
    "What is 17 multiplied by 3? Show your reasoning briefly.",
)


def read_prompts(path: str | os.PathLike[str] | None) -> list[str]:
    """Built-in prompts, or a file: a JSON list of strings, or one prompt per non-empty line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    import json

    p = Path(path)
    if not p.is_file():
        raise LorcError(f"prompts file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise LorcError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise LorcError(f"{p}: a JSON prompts file must be a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LorcError(f"{p} has no prompts")
    return prompts


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> dict[str, Any]:
    """Agreement of two generations: ``prefix`` identical leading tokens, ``prefix_fraction`` =
    prefix / len(reference), ``overall`` = same token at the same index / max length."""
    prefix = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        prefix += 1
    longest = max(len(reference), len(other))
    same = sum(a == b for a, b in zip(reference, other))
    return {"prefix": prefix, "n_reference": len(reference), "n_other": len(other),
            "prefix_fraction": prefix / len(reference) if reference else float(not other),
            "overall": same / longest if longest else 1.0}


def compare(reference: ModelConfig, other: ModelConfig, prompts: Sequence[str], max_tokens: int = 64,
            threads: int | None = None, n_ctx: int = 2048,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy replies of two models to the same chat prompts and their token agreement."""
    if not prompts:
        raise LorcError("no prompts")
    threads = threads or default_threads()
    replies: dict[str, list[dict[str, Any]]] = {}
    for key, config in (("reference", reference), ("other", other)):
        replies[key] = []
        with open_session(config, n_ctx, min(512, n_ctx), threads) as s:
            for i, p in enumerate(prompts):
                prompt_tokens = tokenize_chat(s, chat_prompt(s, p))
                toks = generate_greedy(s, prompt_tokens, max_tokens)
                replies[key].append({"tokens": toks, "text": s.detokenize(toks)})
                if log:
                    log(f"[{config.label}] prompt {i + 1}/{len(prompts)}: {len(toks)} tokens")
    items = []
    prefix = same_total = longest_total = ref_total = 0
    for p, a, b in zip(prompts, replies["reference"], replies["other"]):
        agr = token_agreement(a["tokens"], b["tokens"])
        items.append({"prompt": p, "reference": a, "other": b, "agreement": agr})
        prefix += agr["prefix"]
        ref_total += agr["n_reference"]
        longest = max(agr["n_reference"], agr["n_other"])
        longest_total += longest
        same_total += round(agr["overall"] * longest)
    return {
        "tool": "compare",
        "reference": reference.describe(), "other": other.describe(),
        "max_tokens": max_tokens,
        "prefix_agreement": prefix / ref_total if ref_total else 1.0,
        "overall_agreement": same_total / longest_total if longest_total else 1.0,
        "identical_replies": sum(it["reference"]["tokens"] == it["other"]["tokens"] for it in items),
        "prompts": items,
        "versions": versions(),
    }


def format_compare(report: dict[str, Any]) -> str:
    ref, oth = report["reference"]["label"], report["other"]["label"]
    out = []
    for i, it in enumerate(report["prompts"], 1):
        a = it["agreement"]
        out.append(f"=== prompt {i}: {it['prompt']}")
        out.append(f"--- {ref} ({a['n_reference']} tokens)")
        out.append(it["reference"]["text"].strip())
        out.append(f"--- {oth} ({a['n_other']} tokens; identical prefix {a['prefix']}, "
                   f"overall {100 * a['overall']:.1f}%)")
        out.append(it["other"]["text"].strip())
        out.append("")
    out.append(f"token agreement of {oth} with {ref}: up to the first divergence "
               f"{100 * report['prefix_agreement']:.1f}%, overall {100 * report['overall_agreement']:.1f}%; "
               f"{report['identical_replies']}/{len(report['prompts'])} replies identical")
    return "\n".join(out)
