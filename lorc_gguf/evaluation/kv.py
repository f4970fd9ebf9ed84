"""KV-cache bytes measured from the runtime: the growth of a sequence's serialized state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..format.info import gguf_info, hybrid_in_effect
from ..runtime.session import CACHE_TYPES, Session

# llama.cpp serializes pos, n_seq_id and one seq_id (int32 each) per cell next to the K/V rows:
# a sequence state grows by this much per token on top of the cache itself
CELL_METADATA_BYTES = 12
KV_PROBE_TOKENS = 128  # tokens used to measure KV bytes per token


@dataclass(frozen=True)
class KvBytes:
    """KV bytes from the runtime's sequence state. ``raw``/``per_token``: what a sequence grows by
    per token, with and without the per-cell metadata llama.cpp serializes next to the rows. A
    hybrid cache adds ``exact_cells`` (sinks + window) at ``exact_bytes_per_cell`` each (KV-only),
    a fixed amount per sequence rather than per token."""

    raw: float
    per_token: float
    exact_cells: int = 0
    exact_bytes_per_cell: float = 0.0

    @property
    def exact_bytes(self) -> float:
        return self.exact_cells * self.exact_bytes_per_cell

    def sequence_bytes(self, n_tokens: int) -> float:
        """KV-only bytes of one sequence of ``n_tokens`` tokens."""
        return n_tokens * self.per_token + min(self.exact_cells, n_tokens) * self.exact_bytes_per_cell


def _cache_bytes_per_value(cache_type: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(CACHE_TYPES[cache_type])]
    return size / block


def measure_kv_bytes(session: Session, tokens: Sequence[int]) -> KvBytes:
    """Bytes per token from the growth of the runtime's sequence state over a short probe.

    An exact window serializes only the exact cells a query can still see, so while the probe runs
    its exact store grows and then stops at sinks + window: the per-token figure is measured on the
    same file as a plain latent cache (0/0 settings), and the exact cells, full-width K and V of
    every global layer in the session's cache types, are reported per sequence. Sliding-window
    layers grow with the probe too (it is shorter than their window): for such models the tools
    read a whole sequence's state instead (``Session.seq_state_size`` with swa_full off)."""
    probe = list(tokens[:min(KV_PROBE_TOKENS, session.params.n_ctx)])
    sinks, window = hybrid_in_effect(session.path, session.params.lorc_sink_tokens, session.params.lorc_recent_window)
    if not sinks + window:
        raw = session.kv_bytes_per_token(probe)
        session.clear()
        return KvBytes(raw, raw - CELL_METADATA_BYTES)
    with Session(session.path, replace(session.params, lorc_sink_tokens=0, lorc_recent_window=0)) as plain:
        latent = plain.kv_bytes_per_token(probe)
    info = gguf_info(session.path)
    per_cell = (info["n_global_layers"] or info["n_layer"]) * (info["key_width"] * _cache_bytes_per_value(session.params.cache_type_k) +
                                  info["value_width"] * _cache_bytes_per_value(session.params.cache_type_v))
    return KvBytes(latent, latent - CELL_METADATA_BYTES, sinks + window, per_cell)
