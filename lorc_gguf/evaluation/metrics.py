"""Scores of logits in float64: log-probabilities, KL divergence, and a mean with its standard error."""

from __future__ import annotations

import math

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in float64."""
    return float(kl_rows(log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))).mean())


def kl_rows(p_logprobs: np.ndarray, q_logprobs: np.ndarray) -> np.ndarray:
    """KL(p || q) of every row, from log-probabilities."""
    return (np.exp(p_logprobs) * (p_logprobs - q_logprobs)).sum(-1)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


# Tokens per batch of ``paired_change``'s standard error: per-token NLL differences between two
# caches of one model can be correlated over neighbouring tokens (a selection that drops a cell moves
# every later token that attends it), so the error is taken over the means of consecutive batches.
# Measured on SmolLM2's default file, k = 64 against every key rebuilt, 4 x 256 decoded tokens at 8K
# (results/topk-w128-8k-c4.md): lag-1 autocorrelation 0.02 / 0.09 (drama / news); the error with
# batches of 1 / 8 / 32 / 64 tokens 0.39 / 0.40 / 0.47 / 0.47% and 0.45 / 0.52 / 0.53 / 0.55%: 32
# is on the plateau, where the per-token formula reads ~15% low.
PAIRED_BATCH = 32


def paired_change(base_nll: list[np.ndarray], nll: list[np.ndarray], batch: int = PAIRED_BATCH) -> tuple[float, float]:
    """Perplexity change of a model against a baseline scored on the same tokens, ``exp(mean(nll -
    base_nll)) - 1``, and its standard error: batch means of the per-token differences (batches of
    ``batch`` consecutive tokens within each chunk), delta method. Arrays are per chunk."""
    if len(base_nll) != len(nll) or any(a.shape != b.shape for a, b in zip(base_nll, nll)):
        raise ValueError("paired_change needs the same scored tokens for both models")
    d = [b.astype(np.float64) - a.astype(np.float64) for a, b in zip(base_nll, nll)]
    mean = float(np.concatenate(d).mean())
    _, se = mean_se(np.array([part.mean() for x in d for part in np.array_split(x, max(1, len(x) // batch))]))
    return math.expm1(mean), math.exp(mean) * se
