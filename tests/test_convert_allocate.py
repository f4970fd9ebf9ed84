"""Rank allocation rules on plain arrays (no GGUF): the progressive formula, budgets, rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorc_gguf.converter import allocate
from lorc_gguf.converter.allocate import RankGrid
from lorc_gguf.errors import LorcError

WIDTH = 256
N_LAYER = 12
RNG = np.random.default_rng(7)
KAPPA_K = tuple(float(k) for k in np.exp(RNG.uniform(0.5, 6.0, N_LAYER)))
KAPPA_V = tuple(float(k) for k in np.exp(RNG.uniform(0.5, 3.0, N_LAYER)))
WIDTHS = (WIDTH,) * N_LAYER


def _assert_order_follows(profile: np.ndarray, ranks: tuple[int, ...]) -> None:
    """A layer with a larger cumulative condition never gets less rank."""
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if profile[i] > profile[j]:
                assert ranks[i] >= ranks[j], (i, j, profile[i], profile[j], ranks)


def test_cumulative_condition_is_a_suffix_sum_of_logs() -> None:
    kappa = [np.e, np.e ** 2, np.e ** 3]
    np.testing.assert_allclose(allocate.cumulative_log_condition(kappa), [6.0, 5.0, 3.0])
    np.testing.assert_allclose(allocate.normalized_profile(kappa), [1.0, 2 / 3, 0.0])
    # a flat profile (one layer, or kappa == 1 everywhere) degenerates to a uniform ramp
    np.testing.assert_array_equal(allocate.normalized_profile([1.0, 1.0]), [0.0, 0.0])


def test_progressive_matches_the_paper_formula_before_rounding() -> None:
    """With a unit grid the ranks are r_min + n_l (d - r_min) rounded, for one r_min per budget."""
    grid = RankGrid(multiple=1, min_rank=1)
    alloc = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=0.5, key_ratio=0.5, grid=grid)
    n = allocate.normalized_profile(KAPPA_K)
    ranks = np.asarray(alloc.key_rank, dtype=float)
    # recover r_min from the deepest layer (n = 0 there) and check every other layer against it
    r_min = ranks[n.argmin()]
    np.testing.assert_allclose(ranks, r_min + n * (WIDTH - r_min), atol=1.0)
    assert alloc.key_rank[0] == WIDTH  # n_0 = 1: the first layer stays dense
    assert abs(sum(alloc.key_rank) - 0.5 * WIDTH * N_LAYER) <= 1


@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.5, 0.7])
def test_progressive_budget_and_order(ratio: float) -> None:
    alloc = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=ratio)
    # rounding to multiples of 32 over 24 matrices: the total lands within half a step of the target
    assert abs(alloc.kept_fraction - ratio) <= 16 / WIDTH / N_LAYER + 1e-9
    for side_kappa, ranks in ((KAPPA_K, alloc.key_rank), (KAPPA_V, alloc.value_rank)):
        assert all(r % 32 == 0 and 32 <= r <= WIDTH for r in ranks)
        _assert_order_follows(allocate.cumulative_log_condition(side_kappa), ranks)


def test_budget_below_the_floor_extends_the_ramp_and_clamps() -> None:
    # r_min = 32 would keep ~0.56 here; 0.25 needs the ramp extended below the floor (r_min < 0)
    alloc = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=0.25)
    assert alloc.key_rank[0] == WIDTH and alloc.value_rank[0] == WIDTH
    assert alloc.key_rank.count(32) >= 3 and alloc.value_rank.count(32) >= 3
    assert alloc.kept_fraction == pytest.approx(0.25, abs=16 / WIDTH / N_LAYER)
    # below what the floor allows (first layer dense, the rest at 32) the rule does its best
    lowest = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=0.1)
    assert lowest.key_rank == (WIDTH,) + (32,) * (N_LAYER - 1)


def test_separate_key_and_value_budgets() -> None:
    alloc = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=0.5, key_ratio=0.3, value_ratio=0.8)
    assert alloc.side_fraction(allocate.Side.KEY) == pytest.approx(0.3, abs=16 / WIDTH)
    assert alloc.side_fraction(allocate.Side.VALUE) == pytest.approx(0.8, abs=16 / WIDTH)
    only_k = allocate.uniform(WIDTHS, WIDTHS, ratio=0.5, key_ratio=0.25)
    assert set(only_k.key_rank) == {64} and set(only_k.value_rank) == {128}  # V falls back to --ratio


def test_uniform_rounds_with_a_balanced_remainder() -> None:
    alloc = allocate.uniform(WIDTHS, WIDTHS, ratio=0.5)
    assert set(alloc.key_rank) == set(alloc.value_rank) == {128}
    # 0.3 * 256 = 76.8 is between grid points 64 and 96: a mix that meets the budget
    mixed = allocate.uniform(WIDTHS, WIDTHS, ratio=0.3)
    assert set(mixed.key_rank + mixed.value_rank) == {64, 96}
    assert mixed.kept_fraction == pytest.approx(0.3, abs=16 / WIDTH / N_LAYER)
    # shallower layers take the extra step first, so ranks never increase with depth
    assert list(mixed.key_rank) == sorted(mixed.key_rank, reverse=True)


def test_full_ratio_keeps_everything_dense() -> None:
    alloc = allocate.progressive(KAPPA_K, KAPPA_V, WIDTHS, WIDTHS, ratio=1.0)
    assert alloc.key_rank == alloc.value_rank == WIDTHS
    assert not any(alloc.is_factorized(side, il) for side in allocate.SIDES for il in range(N_LAYER))


def test_width_not_a_multiple_of_the_grid() -> None:
    """d = 240 (3 heads of 80): grid 32..224, then 240 itself (dense)."""
    assert RankGrid().allowed(240) == [32, 64, 96, 128, 160, 192, 224, 240]
    alloc = allocate.uniform((240,) * 4, (240,) * 4, ratio=0.95)
    assert set(alloc.key_rank + alloc.value_rank) <= {224, 240}


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio: float) -> None:
    with pytest.raises(LorcError, match="ratio must be in"):
        allocate.uniform(WIDTHS, WIDTHS, ratio=ratio)


def test_parse_ranks_forms(tmp_path) -> None:
    assert allocate.parse_ranks("1,2,3,4", 2) == ([1, 3], [2, 4])
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"key_rank": [32, 64], "value_rank": [96, 128]}))
    assert allocate.parse_ranks(str(path), 2) == ([32, 64], [96, 128])
    with pytest.raises(LorcError, match="expected 4"):
        allocate.parse_ranks("1,2,3", 2)
    with pytest.raises(LorcError, match="not valid JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        allocate.parse_ranks(str(bad), 2)
    with pytest.raises(LorcError, match="outside"):
        allocate.explicit([0, 1], [1, 1], (64, 64), (64, 64))
