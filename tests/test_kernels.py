"""The patched ggml-cpu kernels against plain references, as standalone programs (tests/kernels/)
compiled against the programs build of the patched tree: top_k's filtered selection against a full
sort, the vector row maximum against the scalar loop on every instruction set this machine runs,
soft_max the same bits on 1, 2 and 3 threads (its rows split over all heads) and near a double
softmax, out_prod of f16, quantized and bf16 rows the same bits on 1, 2 and 3 threads and near a
double sum, and mul_mat of batches of small matrices (whole matrices per thread) the same bits on 1,
2 and 3 threads and as each matrix alone."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from lorc_gguf.runtime import programs

KERNELS = Path(__file__).parent / "kernels"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def run(exe: Path) -> str:
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_top_k_keeps_the_k_largest_values(bin_dir, tmp_path):
    # rows of 65-16,384 with k = 1-256: the filtered path (4k < n) and the plain one; a threshold
    # taken from the best instead of the k-th best kept made 68 of the 408 rows fail
    out = run(programs.ggml_program(KERNELS / "topk_check.cpp", tmp_path / "topk_check", bin_dir))
    assert out.strip().endswith("408 rows, 0 bad"), out


# the AVX and scalar builds of the same file only where the compiler targets x86
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


@pytest.mark.parametrize("isa", ["-march=native", "-mavx2", "-msse3"] if X86 else ["-march=native"])
def test_vector_row_maximum_is_the_scalar_loops(bin_dir, tmp_path, isa):
    # -march=native takes AVX-512 where the machine has it, -mavx2 the AVX path, -msse3 the scalar
    # loop alone; every length 0-600 covers the blocks and tails of each (a tail loop that stopped one
    # element short made 615 of the 3606 arrays fail)
    exe = programs.ggml_program(KERNELS / "vec_max_check.cpp", tmp_path / "vec_max_check", bin_dir,
                                flags=("-O2", isa))
    out = run(exe)
    assert out.strip().endswith("0 differ"), out


def test_soft_max_rows_split_over_heads_give_the_same_bits(bin_dir, tmp_path):
    # threads stepping nth + 1 rows instead of nth (rows left unwritten) made 1836 of the 3672 runs
    # differ and the reference's check fail
    out = run(programs.ggml_program(KERNELS / "soft_max_check.cpp", tmp_path / "soft_max_check", bin_dir))
    assert "0 differ between thread counts" in out, out


def test_out_prod_of_f16_quantized_and_bf16_rows(bin_dir, tmp_path):
    # few dst rows split the row elements over the threads (whole vectors, whole q8_0 / q4_0 blocks);
    # a quantized slice converted from the row's start instead of its own offset made 264 of the 520
    # cases differ between thread counts (0.85 from the double sum). bf16 rows take pairs of rows with
    # bf16 dot products: their weights read one cell late made 80 of the 720 cases differ (0.78)
    out = run(programs.ggml_program(KERNELS / "out_prod_check.cpp", tmp_path / "out_prod_check", bin_dir))
    assert "0 differ between thread counts" in out, out


def test_mul_mat_batches_of_small_matrices(bin_dir, tmp_path):
    # batches of at least 4 matrices per thread give each thread whole matrices; a thread reading
    # its src0 matrix from the wrong index (i12/(r2 + 1) for i12/r2) made 252 of the 432 cases differ
    # between thread counts
    out = run(programs.ggml_program(KERNELS / "mul_mat_batch_check.cpp", tmp_path / "mul_mat_batch_check", bin_dir))
    assert "0 differ between thread counts, 0 matrices differ from the matrix alone" in out, out
