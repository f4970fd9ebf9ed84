"""The latent cache with an exact window (files converted for the "hybrid cache"): exact K/V for
the first S positions and the last W positions, the latent cache for every other cell. Checked against an independent numpy forward of the rule
(tests/reference.py), and at its two limits (everything exact = the original model, S = W = 0 =
the plain latent cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import reference
import synth
from lorc_gguf import convert
from lorc_gguf.format.info import gguf_lorc_version
from lorc_gguf.runtime.library import silence_llama_logs
from lorc_gguf.runtime.session import Session, SessionParams

pytest.importorskip("llama_cpp")
silence_llama_logs()

SINKS, WINDOW = 4, 16
N_LAYER = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hybrid")
    original = synth.make_llama_gguf(d / "original.gguf", n_layer=N_LAYER, n_embd=256, n_head=8, n_head_kv=2,
                                     head_dim=64, n_ff=512, seed=5)
    out = {"original": original}
    # "-wide": value rank 96 above the head width 64, so prompt ubatches rebuild the latent values
    # before attention instead of lifting the output (see test_runtime.values_rebuilt). The hybrid
    # files rebuild every key when decoding (the converter's default with the exact window selects:
    # tests/test_topk.py), so that decoding here checks the exact store alone
    for suffix, ratio in (("", 0.5), ("-wide", 0.75)):
        for name, hybrid in ((f"plain{suffix}", {}),
                             (f"hybrid{suffix}", dict(sink_tokens=SINKS, recent_window=WINDOW, decode_top_k=0))):
            out[name] = d / f"{name}.gguf"
            convert(original, out[name], allocation="uniform", ratio=ratio, outtype="f32", progress=False, data_free=True, **hybrid)
    return out


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, synth.VOCAB_SIZE - 100, n)]


def run(path: Path, tokens: list[int], **params) -> np.ndarray:
    with Session(path, SessionParams(n_ctx=256, **params)) as s:
        return s.decode_seq(tokens)


F32 = dict(cache_type_k="f32", cache_type_v="f32")


def test_hybrid_file_records_its_defaults(models):
    import gguf

    fields = gguf.GGUFReader(str(models["hybrid"])).fields
    assert fields["lorc.sink_tokens"].contents() == SINKS
    assert fields["lorc.recent_window"].contents() == WINDOW
    assert gguf_lorc_version(models["hybrid"]) == 1


@pytest.mark.parametrize("width", ["", "-wide"])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_mixed_case_matches_reference_rule(models, flash_attn, width):
    # float64 numpy against float32 llama.cpp with an f32 cache: measured max error ~5e-6 on
    # logits of size ~5; 1e-3 leaves margin for thread-count dependent summation order while any
    # cell routed to the wrong store moves logits by > 0.05 here
    tokens = prompt(64)
    want = reference.forward(models["original"], tokens, models["plain" + width],
                             exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    got = run(models["hybrid" + width], tokens, flash_attn=flash_attn, **F32)
    np.testing.assert_allclose(got, want, atol=1e-3)
    plain = reference.forward(models["original"], tokens, models["plain" + width])
    assert np.abs(plain - want).max() > 0.05  # the rule matters on this prompt


@pytest.mark.parametrize("width", ["", "-wide"])
def test_prompt_in_query_blocks_matches_reference_rule(models, width):
    # prompt ubatches of 64 taken in blocks of 16 queries (lorc_prefill_block), each against the sink
    # slots and the window + block positions it reaches: the first ubatch holds the sinks itself,
    # later ones read sinks and window from earlier ubatches, the last (32 tokens) has two blocks.
    # Tolerance as in test_mixed_case_matches_reference_rule
    tokens = prompt(224, seed=6)
    want = reference.forward(models["original"], tokens, models["plain" + width],
                             exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    blocks = run(models["hybrid" + width], tokens, n_batch=64, n_ubatch=64, lorc_prefill_block=16, **F32)
    joint = run(models["hybrid" + width], tokens, n_batch=64, n_ubatch=64, lorc_prefill_block=0, **F32)
    np.testing.assert_allclose(blocks, want, atol=1e-3)
    np.testing.assert_allclose(joint, want, atol=1e-3)
    # the two paths sum in different orders: bit-equal logits would mean the blocks never ran
    assert not np.array_equal(blocks, joint)


def test_prompt_in_query_blocks_of_a_q8_0_cache(models):
    # a quantized exact store takes the blocks too (its gathered rows come out as f32), on q8_0 caches
    # with flash attention (which llama.cpp's quantized V needs). Measured against the reference: the
    # caches' q8_0 rounding puts the joint path's logits 0.0103 off on average (max 0.084, logits of
    # size ~5), the blocks' 0.0095 (max 0.079), the plain latent cache (the rule ignored) 0.46;
    # bounds: the blocks no further off than 1.2x the joint path, and 0.1 at most
    tokens = prompt(224, seed=6)
    want = reference.forward(models["original"], tokens, models["plain"],
                             exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    q8 = dict(cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True, n_batch=64, n_ubatch=64)
    blocks = run(models["hybrid"], tokens, lorc_prefill_block=16, **q8)
    joint = run(models["hybrid"], tokens, lorc_prefill_block=0, **q8)
    assert np.abs(blocks - want).mean() < 1.2 * np.abs(joint - want).mean()
    assert np.abs(blocks - want).max() < 0.1
    # bit-equal logits would mean the blocks never ran
    assert not np.array_equal(blocks, joint)


def test_one_sequence_reserves_compute_for_query_blocks(models):
    # a context of one sequence takes its prompt ubatches in query blocks (lorc_prefill_block, 64 by
    # default) and reserves its compute buffer for them: the joint path's scores of every query over
    # every cell (n_ctx x n_ubatch x n_head f32 = 16384 x 512 x 8 x 4 B = 256 MiB here) would size it.
    # A unified cache of two sequences may see both in one ubatch, which takes the joint path, so
    # that context is reserved for it, as is one whose blocks are turned off
    def compute_mib(**p):
        with Session(models["hybrid"], SessionParams(n_ctx=16384, n_batch=512, n_ubatch=512, **p)) as s:
            return s.compute_buffer_bytes / 2**20

    one = compute_mib()
    joint = compute_mib(lorc_prefill_block=0)
    two = compute_mib(n_seq_max=2, kv_unified=True)
    assert joint > 256 and two > 256
    # a block's scores: 16384 x 64 x 8 x 4 B = 32 MiB
    assert one < joint / 2


def test_flash_attention_s_f16_mask_does_not_grow_the_block_reservation(models):
    # with flash attention the latent mask is f16 (16384 x 512 x 2 B = 16 MiB) and the blocks' masks
    # keep that type. Measured: 97.5 MiB with it (97.0 with q8_0 caches) against 106.9 without it;
    # when the blocks cast it to an f32 copy (32 MiB) and built f32 block masks, 126.7 (129.3)
    def compute_mib(**p):
        with Session(models["hybrid"], SessionParams(n_ctx=16384, n_batch=512, n_ubatch=512, **p)) as s:
            return s.compute_buffer_bytes / 2**20

    assert compute_mib(flash_attn=True) <= compute_mib()
    assert compute_mib(flash_attn=True, cache_type_k="q8_0", cache_type_v="q8_0") <= compute_mib()


@pytest.mark.parametrize("n_tokens, n_block", [(230, 16), (220, 24)])
def test_prompt_in_ragged_query_blocks_matches_reference_rule(models, n_tokens, n_block):
    # ubatches that are not a multiple of the block: the last block of each holds the rest (230 in
    # ubatches of 64: the last of 38 = 16 + 16 + 6; 220 in blocks of 24: 24 + 24 + 16 per full
    # ubatch, 24 + 4 in the last of 28). Tolerance as in test_mixed_case_matches_reference_rule
    tokens = prompt(n_tokens, seed=9)
    want = reference.forward(models["original"], tokens, models["plain"],
                             exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    blocks = run(models["hybrid"], tokens, n_batch=64, n_ubatch=64, lorc_prefill_block=n_block, **F32)
    joint = run(models["hybrid"], tokens, n_batch=64, n_ubatch=64, lorc_prefill_block=0, **F32)
    np.testing.assert_allclose(blocks, want, atol=1e-3)
    np.testing.assert_allclose(joint, want, atol=1e-3)
    # a partial ubatch alone (the first of its context) runs in blocks too: the two paths sum in
    # different orders, so bit-equal logits would mean it fell back to the joint path
    tail = tokens[:n_tokens % 64]
    assert not np.array_equal(run(models["hybrid"], tail, n_batch=64, n_ubatch=64, lorc_prefill_block=n_block, **F32),
                              run(models["hybrid"], tail, n_batch=64, n_ubatch=64, lorc_prefill_block=0, **F32))


def test_sinks_survive_the_exact_store_wrapping(models):
    # the exact store holds S + W + n_ubatch cells (padded to 32: 64 here); a prompt of 100 tokens
    # in ubatches of 32 and 40 single-token steps overwrite its cells many times. The sinks must
    # stay exact throughout (purging a sequence's positions below the highest one a ubatch overwrites
    # would drop them: logits off by ~1 from the second ubatch on). Tolerance as in
    # test_mixed_case_matches_reference_rule
    tokens = prompt(140, seed=7)
    want = reference.forward(models["original"], tokens, models["plain"],
                             exact=lambda p0, p1: p0 < SINKS or p1 - p0 < WINDOW)
    with Session(models["hybrid"], SessionParams(n_ctx=256, n_batch=32, n_ubatch=32, **F32)) as s:
        prefill = s.decode_seq(tokens[:100])
        steps = np.stack([s.decode_seq([t], pos0=100 + i)[0] for i, t in enumerate(tokens[100:])])
    np.testing.assert_allclose(np.concatenate([prefill, steps]), want, atol=1e-3)


def test_sinks_only_see_the_token_itself_exactly(models):
    # W = 0: the exact store keeps the sinks and, its window being at least one position, the token
    # being processed; the latent store masks what the exact store shows, so every cell counts once
    # (counting the token in both stores moved logits by ~2.4). Tolerance as in
    # test_mixed_case_matches_reference_rule
    tokens = prompt(64, seed=8)
    want = reference.forward(models["original"], tokens, models["plain"],
                             exact=lambda p0, p1: p0 < SINKS or p0 == p1)
    got = run(models["hybrid"], tokens, lorc_recent_window=0, **F32)
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_everything_exact_is_the_original_model(models):
    tokens = prompt(64, seed=1)
    got = run(models["hybrid"], tokens, lorc_recent_window=256, **F32)
    np.testing.assert_allclose(got, run(models["original"], tokens, **F32), atol=1e-3)


def test_no_sinks_no_window_is_the_plain_latent_cache(models):
    tokens = prompt(64, seed=2)
    got = run(models["hybrid"], tokens, lorc_sink_tokens=0, lorc_recent_window=0)
    np.testing.assert_allclose(got, run(models["plain"], tokens), atol=1e-5)


@pytest.mark.parametrize("width", ["", "-wide"])
def test_token_by_token_decode_equals_batched_prefill(models, width):
    # the rule is evaluated per (query, cell) in every ubatch, so splitting the prompt into
    # one-token decode steps must give the prefill's logits (with "-wide", the prefill rebuilds
    # values and joins the two stores' keys, the steps lift values and join scores)
    tokens = prompt(60, seed=3)
    with Session(models["hybrid" + width], SessionParams(n_ctx=256, **F32)) as s:
        batched = s.decode_seq(tokens)
        s.clear()
        s.decode_seq(tokens[:20], logits=False)
        steps = np.stack([s.decode_seq([t], pos0=20 + i)[0] for i, t in enumerate(tokens[20:])])
    np.testing.assert_allclose(steps, batched[20:], atol=1e-4)


def test_sequences_state_and_copies_stay_consistent(models):
    tokens = prompt(70, seed=4)
    other = prompt(70, seed=5)
    with Session(models["hybrid"], SessionParams(n_ctx=256, n_seq_max=2, **F32)) as s:
        ref = s.decode_seq(tokens)
        s.clear()
        ref_other = s.decode_seq(other)
        s.clear()
        both = s.decode([(t, i, 0) for i, t in enumerate(tokens)] + [(t, i, 1) for i, t in enumerate(other)])
        np.testing.assert_allclose(both[:70], ref, atol=1e-4)
        np.testing.assert_allclose(both[70:], ref_other, atol=1e-4)

        s.clear()
        s.decode_seq(tokens[:60], logits=False)
        state = s.seq_state(0)
        s.clear()
        s.set_seq_state(state, 1)
        # the restored stores hold the same cells in other slots: only summation order changes
        np.testing.assert_allclose(s.decode_seq(tokens[60:], pos0=60, seq_id=1), ref[60:], atol=1e-3)

        s.clear()
        s.decode_seq(tokens[:60], logits=False)
        s.seq_cp(0, 1)
        s.seq_keep(1)
        np.testing.assert_allclose(s.decode_seq(tokens[60:], pos0=60, seq_id=1), ref[60:], atol=1e-4)


def test_context_shift_keeps_sinks_and_window(models):
    # llama.cpp's context shift keeps the first tokens and drops the next ones: sinks keep their
    # positions, the window moves with the tokens. The exact store re-ropes its keys like any
    # dense cache, the latent store only moves positions; compare with the reference rule applied
    # to what the cache holds afterwards is not possible (the kept cells were computed with the
    # dropped context), so check the invariants: finite logits, the same logits as a copy of the
    # sequence shifted the same way, and sequence bounds.
    tokens = prompt(90, seed=6)
    with Session(models["hybrid"], SessionParams(n_ctx=256, n_seq_max=2)) as s:
        s.decode_seq(tokens[:70], logits=False)
        s.seq_cp(0, 1)
        for seq in (0, 1):
            assert s.seq_rm(seq, SINKS, SINKS + 30)
            s.seq_add(seq, SINKS + 30, -1, -30)
        assert s.seq_pos_max(0) == 39
        a = s.decode_seq(tokens[70:], pos0=40, seq_id=0)
        b = s.decode_seq(tokens[70:], pos0=40, seq_id=1)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_cutting_back_past_the_window_is_refused(models):
    # The exact store overwrites the window's older cells as the window moves on (a 16-token ubatch
    # keeps it at 64 cells here). Cutting a sequence back to a prefix whose window is gone would
    # leave its next tokens reading latent cells where a fresh run reads exact ones, so the removal
    # is refused and removes nothing (llama-server and llama_cpp.Llama then process the prompt
    # again); a cut that keeps the window is exact
    tokens = prompt(150, seed=8)
    small = SessionParams(n_ctx=256, n_batch=16, n_ubatch=16, n_seq_max=2, **F32)
    with Session(models["hybrid"], small) as s:
        s.decode_seq(tokens, logits=False)
        assert not s.seq_rm(0, 40, -1)          # the window of position 40 was [25, 40): overwritten
        assert s.seq_pos_max(0) == 149          # nothing removed
        assert s.seq_rm(0, 140, -1)             # the window of 140, [125, 140), is still held
        np.testing.assert_allclose(s.decode_seq(tokens[140:141], pos0=140), run_last(models["hybrid"], tokens[:141]),
                                   atol=1e-4)
        assert s.seq_rm(0, -1, -1) and s.seq_pos_max(0) == -1  # whole sequences always go
        s.decode_seq(tokens, logits=False)
        s.seq_cp(0, 1)
        assert not s.seq_rm(-1, 40, -1)         # every sequence is checked
        assert s.seq_pos_max(1) == 149


def run_last(path: Path, tokens: list[int]) -> np.ndarray:
    """The last token's logits of a fresh run over tokens, [1, n_vocab]"""
    return run(path, tokens, **F32)[-1:]


def test_state_bytes_count_latent_rows_plus_the_exact_cells(models):
    tokens = prompt(100, seed=7)
    d_kv = 2 * 64
    dense_row, latent_row = N_LAYER * 2 * d_kv * 2, N_LAYER * d_kv * 2  # f16 bytes per cell, K+V
    with Session(models["hybrid"], SessionParams(n_ctx=256)) as s, \
         Session(models["plain"], SessionParams(n_ctx=256)) as p:
        s.decode_seq(tokens, logits=False)
        p.decode_seq(tokens, logits=False)
        extra = s.seq_state_size(0) - p.seq_state_size(0)
    # the exact store serializes its sinks and window, never the whole sequence: 12 bytes of
    # cell metadata per cell, plus a header (stream and cell counts, v_trans, n_layer, then a
    # type and a row size per layer and side: 16 + 24 * n_layer bytes)
    n_exact = SINKS + WINDOW
    assert extra == n_exact * (dense_row + 12) + 16 + 24 * N_LAYER
    assert latent_row == dense_row // 2
