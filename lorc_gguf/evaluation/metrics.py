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
