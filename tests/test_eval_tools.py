"""tools/eval.py, tools/bench.py, tools/compare.py and the plots on a tiny synthetic model and its
LoRC conversion: JSON fields, perplexity against a direct computation, KV ratios against the
ranks written in the file, PNG output, one-line errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

import synth
from lorc_gguf import convert
from lorc_gguf.cli.bench import bench_main
from lorc_gguf.cli.compare import compare_main
from lorc_gguf.cli.eval import eval_main
from lorc_gguf.cli.plot import plot_main
from lorc_gguf.corpus import calibration_text, eval_text, pydoc_text
from lorc_gguf.errors import LorcError
from lorc_gguf.evaluation.compare import token_agreement
from lorc_gguf.evaluation.configs import ModelConfig, make_config
from lorc_gguf.evaluation.kv import CELL_METADATA_BYTES
from lorc_gguf.evaluation.perplexity import evaluate
from lorc_gguf.evaluation.plots import merge_bench_reports, pareto_front
from lorc_gguf.format import keys as constants
from lorc_gguf.format.info import hybrid_in_effect
from lorc_gguf.runtime.session import Session, SessionParams

pytest.importorskip("llama_cpp")

CTX, CHUNKS = 64, 2
N_LAYER, D_KV = 4, 64  # synth defaults: n_head_kv 2 x head_dim 32
THREADS = ["--threads", "1"]  # OpenMP threads spin badly on a loaded 2-core machine


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("evaltools")
    original = synth.make_llama_gguf(d / "original.gguf", seed=3, dtype="f16")
    lorc = d / "lorc.gguf"
    convert(original, lorc, allocation="progressive", ratio=0.5, progress=False, data_free=True)
    return original, lorc


def file_ranks(path: Path) -> tuple[list[int], list[int]]:
    reader = gguf.GGUFReader(str(path))

    def arr(key):
        f = reader.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    return arr(constants.key_rank_key("llama")), arr(constants.value_rank_key("llama"))


def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"


def test_hybrid_kv_bytes_count_the_exact_cells_per_sequence(pair, tmp_path):
    # a hybrid file's latent rows grow per token like the plain file's; its exact store adds
    # S + W full-width cells per sequence (f16 K and V of every layer), not per token. The old
    # 128-token probe counted every probe token in both stores (ratio ~1.5 for W >= 128)
    original, lorc = pair
    hybrid = tmp_path / "hybrid.gguf"
    convert(original, hybrid, allocation="progressive", ratio=0.5, progress=False, data_free=True, sink_tokens=4, recent_window=8)
    configs = [ModelConfig(p, flash_attn=False, label=p.stem) for p in (original, lorc, hybrid)]
    report = evaluate(configs, eval_text(), ctx=CTX, n_chunks=1, threads=1)
    base, plain, hyb = report["models"]
    assert hyb["kv_bytes_per_token"] == plain["kv_bytes_per_token"] < base["kv_bytes_per_token"]
    assert plain["kv_exact_cells"] == 0 and hyb["kv_exact_cells"] == 4 + 8
    assert hyb["kv_exact_bytes"] == (4 + 8) * N_LAYER * 2 * D_KV * 2
    assert hyb["kv_bytes_at_ctx"] == CTX * hyb["kv_bytes_per_token"] + hyb["kv_exact_bytes"]
    # the runtime settings 0/0 turn the file into a plain latent cache; None keeps the file's
    assert hybrid_in_effect(hybrid, 0, 0) == (0, 0)
    assert hybrid_in_effect(hybrid) == (4, 8)


def test_calibration_and_eval_text_are_disjoint_halves():
    full, cal, evl = pydoc_text(), calibration_text(), eval_text()
    assert cal + evl == full
    assert abs(len(cal) - len(evl)) < 0.01 * len(full)
    assert cal[-2000:] not in evl and evl[:2000] not in cal


def test_eval_json_and_table(pair, tmp_path, capsys):
    original, lorc = pair
    out, png = tmp_path / "eval.json", tmp_path / "pareto.png"
    rc = eval_main([str(original), f"{original}@q8_0", str(lorc), "--ctx", str(CTX), "--chunks", str(CHUNKS),
                       "--text", "docs", "--json", str(out), "--plot", str(png), "-q", *THREADS])
    stdout = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["tool"] == "eval" and report["ctx"] == CTX and report["baseline"] == "original"
    base, q8, lo = report["models"]
    for m in report["models"]:
        for key in ("label", "path", "cache_type_k", "cache_type_v", "flash_attn", "ppl", "ppl_stderr", "nll",
                    "kv_bytes_per_token_raw", "kv_bytes_per_token", "kv_ratio", "kl_mean", "top1_agreement"):
            assert key in m, key
        assert m["n_scored"] == CHUNKS * (CTX // 2 - 1)
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1
        assert math.isfinite(m["ppl_stderr"]) and m["ppl_stderr"] > 0
        assert m["kv_bytes_per_token_raw"] - m["kv_bytes_per_token"] == CELL_METADATA_BYTES
        assert m["label"] in stdout
    assert base["kl_mean"] == 0 and base["top1_agreement"] == 1
    for m in report["models"]:
        # the per-token NLLs reproduce the reported mean; the paired change is the perplexity ratio
        # (rounding to 6 decimals moves a mean of ~500 values by < 1e-6)
        assert len(m["token_nll"]) == m["n_scored"] and np.mean(m["token_nll"]) == pytest.approx(m["nll"], abs=1e-6)
        assert m["ppl_change"] == pytest.approx(m["ppl"] / base["ppl"] - 1, rel=1e-9)
    assert base["ppl_change_stderr"] == 0 and q8["ppl_change_stderr"] > 0 and lo["ppl_change_stderr"] > 0
    assert "%" in stdout and "±" in stdout
    assert base["kv_bytes_per_token"] == N_LAYER * 2 * D_KV * 2  # f16 K and V rows
    assert q8["kv_ratio"] == pytest.approx(34 / 64)  # q8_0: 34 bytes per 32 values
    key_rank, value_rank = file_ranks(lorc)
    rank_ratio = (sum(key_rank) + sum(value_rank)) / (N_LAYER * 2 * D_KV)
    assert rank_ratio < 1
    assert lo["kv_ratio"] == pytest.approx(rank_ratio)
    assert lo["lorc"]["key_rank"] == key_rank
    # a different model has a distribution of its own; the q8_0 cache only perturbs the original
    assert lo["kl_mean"] > 0 and 0 <= lo["top1_agreement"] < 1
    assert 0 < q8["kl_mean"] < lo["kl_mean"]
    assert base["ppl"] != lo["ppl"]
    assert_png(png)


def test_eval_perplexity_matches_a_direct_computation(pair):
    """The tool's NLL against logits of every position from Session.decode_seq: chunk c is tokens
    [c*ctx, (c+1)*ctx) of the BOS-less tokenization, its first token replaced by BOS, and
    tokens ctx/2+1 .. ctx-1 are scored."""
    original, _ = pair
    text = eval_text()
    config = make_config(original, flash_attn=False)
    report = evaluate([config], text, ctx=CTX, n_chunks=CHUNKS, threads=1)
    nll = []
    with Session(original, SessionParams(n_ctx=CTX, n_threads=1)) as s:
        tokens = s.tokenize(text, add_bos=False)
        bos = s.lib.llama_vocab_bos(s.vocab)
        for c in range(CHUNKS):
            chunk = [bos] + tokens[c * CTX + 1:(c + 1) * CTX]
            s.clear()
            logits = s.decode_seq(chunk).astype(np.float64)
            for j in range(CTX // 2, CTX - 1):
                row = logits[j] - logits[j].max()
                nll.append(np.log(np.exp(row).sum()) - row[chunk[j + 1]])
    assert report["models"][0]["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_model_against_itself_has_zero_kl(pair):
    original, _ = pair
    a = make_config(original, label="a")
    b = make_config(original, label="b")
    report = evaluate([a, b], eval_text(), ctx=CTX, n_chunks=1, threads=1)
    m = report["models"][1]
    assert m["kl_mean"] == pytest.approx(0, abs=1e-6) and m["top1_agreement"] == 1 and m["kv_ratio"] == 1


def test_bench_quick_json(pair, tmp_path, capsys):
    original, lorc = pair
    out, png = tmp_path / "bench.json", tmp_path / "speed.png"
    rc = bench_main([str(original), str(lorc), "--quick", "--ctx", "64,128", "--decode-tokens", "4",
                     "--budget-mib", "1", "--json", str(out), "--plot", str(png), "-q", *THREADS])
    stdout = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["tool"] == "bench"
    assert report["settings"]["contexts"] == [64, 128] and report["settings"]["decode_tokens"] == 4
    assert {"cpu", "threads", "backend", "loadavg"} <= set(report["machine"])
    assert report["machine"]["backend"] and report["versions"]["llama_cpp_python"]
    labels = [c["label"] for c in report["configs"]]
    assert labels == ["original", "lorc", "original [q8_0]", "lorc [q8_0]"]
    assert len(report["results"]) == 2 * len(labels)
    for r in report["results"]:
        assert len(r["prefill_s"]) == len(r["decode_s"]) == 1
        for key in ("prefill_tps", "decode_tps"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["decode_depth"] == r["n_ctx"] - 4
    by = {c["label"]: c for c in report["configs"]}
    key_rank, value_rank = file_ranks(lorc)
    rank_ratio = (sum(key_rank) + sum(value_rank)) / (N_LAYER * 2 * D_KV)
    assert by["lorc"]["kv_ratio"] == pytest.approx(rank_ratio)
    assert by["lorc [q8_0]"]["kv_ratio"] == pytest.approx(rank_ratio * 34 / 64)
    for c in report["configs"]:
        assert c["budget_ctx"] == (1 << 20) // c["kv_bytes_per_token"]
        assert c["label"] in stdout
    assert by["lorc"]["budget_ctx"] > by["original"]["budget_ctx"]
    assert_png(png)


def _bench_report(n_ctx, speedups):
    """A tools/bench.py report of an interleaved run at one context: the original and one LoRC file."""
    def row(label, d, p):
        return {"config": label, "n_ctx": n_ctx, "prefill_tps": 100.0 * p, "decode_tps": 10.0 * d,
                "decode_speedup": {"median": d, "q1": d - 0.05, "q3": d + 0.05, "tokens": 8},
                "prefill_speedup": {"median": p, "min": p - 0.01, "max": p + 0.01, "repeats": 2}}
    return {"tool": "bench", "machine": {"cpu": "test cpu"}, "settings": {"decode_tokens": 8, "threads": 2},
            "configs": [{"label": "original"}, {"label": "lorc"}],
            "results": [row("original", 1.0, 1.0), row("lorc", *speedups)]}


def test_plot_speed_merges_one_run_per_context(tmp_path, capsys):
    """tools/plot.py speed takes several bench runs (one per context, as long contexts are run) and
    draws one line per configuration across them; a context given twice is refused, not averaged."""
    paths = []
    for n_ctx, s in ((4096, (0.9, 0.98)), (16384, (1.2, 0.93))):
        paths.append(tmp_path / f"bench-{n_ctx}.json")
        paths[-1].write_text(json.dumps(_bench_report(n_ctx, s)))
    merged = merge_bench_reports(paths)
    lorc = sorted((r["n_ctx"], r["decode_speedup"]["median"]) for r in merged["results"] if r["config"] == "lorc")
    assert lorc == [(4096, 0.9), (16384, 1.2)]
    assert {r["baseline"] for r in merged["results"]} == {"original"}
    png = tmp_path / "speed.png"
    assert plot_main(["speed", *map(str, paths), str(png)]) == 0
    assert_png(png)
    assert plot_main(["speed", str(paths[0]), str(paths[0]), str(tmp_path / "x.png")]) == 2
    assert "context 4096: give each context once" in capsys.readouterr().err


def test_compare_model_against_itself(pair, tmp_path, capsys):
    original, _ = pair
    out = tmp_path / "compare.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n\nWhat is two plus two?\n")
    rc = compare_main([str(original), str(original), "--prompts", str(prompts), "--max-tokens", "8",
                          "--ctx", "256", "--json", str(out), "-q", *THREADS])
    stdout = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert len(report["prompts"]) == 2
    assert report["prefix_agreement"] == 1.0 and report["overall_agreement"] == 1.0
    assert report["identical_replies"] == 2
    assert all(len(p["reference"]["tokens"]) > 0 for p in report["prompts"])
    assert "What is two plus two?" in stdout


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "prefix": 4, "n_reference": 4, "n_other": 4, "prefix_fraction": 1.0, "overall": 1.0}
    a = token_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5])
    assert a["prefix"] == 2 and a["prefix_fraction"] == 0.5 and a["overall"] == pytest.approx(3 / 5)


def test_plot_ranks_and_pareto_front(pair, tmp_path, capsys):
    _, lorc = pair
    png = tmp_path / "ranks.png"
    assert plot_main(["ranks", str(lorc), str(png)]) == 0
    assert_png(png)
    assert pareto_front([(1, 5), (2, 3), (3, 4), (0.5, 9)]) == [3, 0, 1]


@pytest.mark.parametrize("main,argv", [
    (eval_main, ["/no/such/model.gguf"]),
    (compare_main, ["/no/such/a.gguf", "/no/such/b.gguf"]),
    (bench_main, ["/no/such/model.gguf", "--quick"]),
    (plot_main, ["ranks", "/no/such/model.gguf", "out.png"]),
    (plot_main, ["pareto", "/no/such/eval.json", "out.png"]),
])
def test_missing_file_is_one_line_and_exit_2(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "/no/such/" in err and "\n" not in err


def test_quantized_v_cache_without_flash_attention_is_refused(pair, capsys):
    original, _ = pair
    assert eval_main([f"{original}@q8_0", "--flash-attn", "off"]) == 2
    assert "flash attention" in capsys.readouterr().err


def test_plot_of_an_ordinary_model_is_refused(pair, tmp_path, capsys):
    original, _ = pair
    assert plot_main(["ranks", str(original), str(tmp_path / "x.png")]) == 2
    assert "not a LoRC GGUF" in capsys.readouterr().err


def test_plot_quality_table(tmp_path):
    """tools/plot.py quality on a tools/quality_table.py JSON (rows as that tool writes them), and
    the tool's markdown table; a JSON from another tool is refused with a one-line error."""
    from lorc_gguf.evaluation.quality import EXACT, PLAIN, format_quality_table

    def res(news, docs):
        return {"news": {"ppl": news, "vs_original": news / 30 - 1, "kl": 0.01},
                "docs": {"ppl": docs, "vs_original": docs / 9.6 - 1, "kl": 0.02}}
    rows = [{"config": "original", "width": 1.0, "cache": "f16", "kv_ratio": 1.0, "exact_cells": 0,
             "results": res(30.0, 9.6)},
            {"config": "original", "width": 1.0, "cache": "q8_0", "kv_ratio": 0.531, "exact_cells": 0,
             "results": res(30.1, 9.61)},
            {"config": "calibrated, sensitivity", "width": 0.5, "read": PLAIN, "cache": "f16", "kv_ratio": 0.5,
             "exact_cells": 0, "results": res(40.0, 12.6)},
            {"config": "calibrated, sensitivity", "width": 0.5, "read": EXACT, "cache": "f16", "kv_ratio": 0.5,
             "exact_cells": 132, "results": res(30.6, 9.7)}]
    data = {"tool": "quality_table", "eval": {"n_ctx": 512}, "rows": rows, "held_out": ["news"],
            "texts": {"news": "news (...)", "docs": "docs (...)"}, "exact": {"sink_tokens": 4, "recent_window": 128},
            "long": None}
    table = format_quality_table(data)
    assert "| calibrated, sensitivity | 0.50 | exact sinks + window | 50.0% | 30.600 (+2.0%), KL 0.010 | 9.700 (+1.0%) |" \
        in table
    src, png = tmp_path / "quality.json", tmp_path / "quality.png"
    src.write_text(json.dumps(data))
    assert plot_main(["quality", str(src), str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src.write_text(json.dumps({**data, "tool": "eval"}))
    assert plot_main(["quality", str(src), str(tmp_path / "other.png")]) == 2
    assert not (tmp_path / "other.png").exists()


def test_decode_tail_scores_single_token_steps(pair):
    """--decode-tail N: the last N tokens of each chunk are decoded one per llama_decode call and
    only they are scored; for an ordinary model that is the same NLL as batched prefill."""
    original, _ = pair
    config = make_config(original, flash_attn=False)
    tail = evaluate([config], eval_text(), ctx=CTX, n_chunks=CHUNKS, threads=1, decode_tail=8)
    m = tail["models"][0]
    assert m["n_scored"] == CHUNKS * (8 - 1) and tail["decode_tail"] == 8
    nll = []
    with Session(original, SessionParams(n_ctx=CTX, n_threads=1)) as s:
        tokens = s.tokenize(eval_text(), add_bos=False)
        bos = s.lib.llama_vocab_bos(s.vocab)
        for c in range(CHUNKS):
            chunk = [bos] + tokens[c * CTX + 1:(c + 1) * CTX]
            s.clear()
            logits = s.decode_seq(chunk).astype(np.float64)
            for j in range(CTX - 8, CTX - 1):
                row = logits[j] - logits[j].max()
                nll.append(np.log(np.exp(row).sum()) - row[chunk[j + 1]])
    # f16 weights: one-token and batched matmuls round differently (measured ~1e-5 relative)
    assert m["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-3)


def test_eval_on_several_texts_reports_each_and_a_summary(pair, tmp_path, capsys):
    original, lorc = pair
    out = tmp_path / "eval.json"
    rc = eval_main([str(original), str(lorc), "--ctx", str(CTX), "--chunks", "1", "--text", "news,docs",
                       "--json", str(out), "-q", *THREADS])
    stdout = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["texts"] == ["news", "docs"] and [r["text"]["name"] for r in report["reports"]] == ["news", "docs"]
    assert report["reports"][0]["text"]["source"].startswith("news (news prose: gensim 4.4.0 Lee corpus)")
    # different texts, different perplexities; the summary repeats each report's numbers
    news, docs = (r["models"][1]["ppl"] for r in report["reports"])
    assert news != pytest.approx(docs, rel=1e-3)
    lorc_row = report["summary"][1]
    assert lorc_row["ppl"] == {"news": news, "docs": docs}
    base = report["reports"][0]["models"][0]["ppl"]
    assert lorc_row["vs_baseline"]["news"] == pytest.approx(news / base - 1)
    # 31 scored tokens are one batch: no error estimate rather than a made-up one
    assert lorc_row["vs_baseline_stderr"]["news"] is None is report["reports"][0]["models"][1]["ppl_change_stderr"]
    assert "== news: news (news prose" in stdout and "== summary" in stdout


@pytest.mark.parametrize("argv,message", [
    (["--text", "news,docs", "--plot", "x.png"], "--plot draws one text: give a single --text"),
    (["--text", "poetry"], "text not found: poetry is neither a file nor a domain (docs, news, drama)"),
    (["--text", "docs,docs"], "--text names a text twice"),
])
def test_bad_text_is_one_line_and_exit_2(pair, argv, message, capsys):
    original, lorc = pair
    rc = eval_main([str(original), "--ctx", str(CTX), "--chunks", "1", "-q", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_lorc_top_k_runs_each_lorc_model_per_value(pair, tmp_path):
    original, lorc = pair
    out = tmp_path / "eval.json"
    rc = eval_main([str(original), str(lorc), "--ctx", str(CTX), "--chunks", "1", "--decode-tail", "16",
                       "--text", "docs", "--lorc-top-k", "0,4", "--json", str(out), "-q", *THREADS])
    assert rc == 0
    models = json.loads(out.read_text())["models"]
    assert [m["label"] for m in models] == ["original", "lorc", "lorc [top-4]"]
    assert [m["lorc_top_k"] for m in models] == [0, 0, 4]
    # 4 of the ~60 visible cells: the selection must change what the decoded tokens see
    assert models[2]["ppl"] != pytest.approx(models[1]["ppl"], rel=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--lorc-top-k", "-1"], ">= 0"),
    (["--lorc-top-k", "x"], "comma-separated integers"),
    (["--decode-tail", str(CTX - 1)], "--decode-tail must be between"),
])
def test_bad_top_k_or_decode_tail_is_one_line_and_exit_2(pair, argv, message, capsys):
    original, lorc = pair
    rc = eval_main([str(original), str(lorc), "--ctx", str(CTX), "--chunks", "1", "-q", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bench_runs_quantized_caches_with_flash_attention_when_it_is_off(pair):
    # llama.cpp refuses a quantized V cache without flash attention: bench's own quantized configs take
    # it (labelled) while the f16 and bf16 ones keep the requested path
    from lorc_gguf.evaluation.bench import build_configs
    original, lorc = pair
    configs = build_configs(make_config(original, flash_attn=False), [lorc], ["q8_0"], ["q4_0", "bf16"], False)
    assert [(c.label, c.fa) for c in configs] == [
        ("original", False), ("lorc", False), ("original [q8_0, flash attention]", True),
        ("lorc [q4_0, flash attention]", True), ("lorc [bf16]", False)]
    auto = build_configs(make_config(original), [lorc], ["q8_0"], [], None)
    assert [(c.label, c.fa) for c in auto] == [("original", True), ("lorc", True), ("original [q8_0]", True)]


def test_bench_lorc_top_k_labels(pair, tmp_path):
    original, lorc = pair
    out = tmp_path / "bench.json"
    rc = bench_main([str(original), str(lorc), "--ctx", "64", "--repeats", "1", "--decode-tokens", "2",
                     "--cache-types", "", "--lorc-cache-types", "", "--lorc-top-k", "0,8", "--json", str(out),
                     "-q", *THREADS])
    assert rc == 0
    configs = json.loads(out.read_text())["configs"]
    assert [(c["label"], c["lorc_top_k"]) for c in configs] == [("original", 0), ("lorc", 0), ("lorc [top-8]", 8)]


def test_interleaved_bench_takes_every_config_s_chunk_and_token_in_turn(monkeypatch):
    # the order of the calls is the whole point of --interleave: each session's i-th prompt chunk
    # before any session's (i+1)-th, logits only for the prompt's last token, then each session's i-th
    # decoded token before any session's (i+1)-th; each session's own state size and times come back
    # in its own slot
    from lorc_gguf.evaluation import bench

    calls = []

    class FakeSession:
        def __init__(self, name, state):
            self.name, self.state = name, state
            self.params = type("Params", (), {"n_batch": 4})()

        def clear(self):
            calls.append((self.name, "clear"))

        def seq_rm(self, seq_id, p0, p1):
            calls.append((self.name, "seq_rm", p0))
            return True

        def seq_state_size(self, seq_id):
            return self.state

    def fake_decode(session, tokens, pos0=0, outputs_from=None):
        calls.append((session.name, len(tokens), pos0, outputs_from))

    monkeypatch.setattr(bench, "decode_tokens", fake_decode)
    a, b = FakeSession("a", 11), FakeSession("b", 22)
    prompt = list(range(10))
    out = bench.measure_interleaved([a, b], [prompt, prompt], 10, 3)
    assert calls[:2] == [("a", "clear"), ("b", "clear")]
    assert calls[2:8] == [("a", 4, 0, 4), ("b", 4, 0, 4), ("a", 4, 4, 4), ("b", 4, 4, 4),
                          ("a", 2, 8, None), ("b", 2, 8, None)]
    assert calls[8:10] == [("a", "seq_rm", 7), ("b", "seq_rm", 7)]
    assert calls[10:-2] == [("a", 1, 7, None), ("b", 1, 7, None), ("a", 1, 8, None), ("b", 1, 8, None),
                            ("a", 1, 9, None), ("b", 1, 9, None)]
    assert [o[2] for o in out] == [11, 22] and all(o[0] >= 0 and len(o[1]) == 3 and min(o[1]) >= 0 for o in out)
    assert calls[-2:] == [("a", "clear"), ("b", "clear")]


def test_interleaved_prefill_takes_spans_of_the_largest_batch(monkeypatch):
    # configs of different prompt batches (--lorc-batch) are interleaved by spans of the largest: a
    # session of batch 2 prefills a span of 4 in two chunks before the session of batch 4 prefills it
    # in one, each chunk at its own position, logits for the prompt's last token only; a batch that
    # does not divide the largest is refused (its chunks would straddle the spans)
    from lorc_gguf.evaluation import bench

    calls = []

    class FakeSession:
        def __init__(self, name, n_batch):
            self.name = name
            self.params = type("Params", (), {"n_batch": n_batch})()

        def clear(self):
            pass

        def seq_rm(self, seq_id, p0, p1):
            return True

    def fake_decode(session, tokens, pos0=0, outputs_from=None):
        calls.append((session.name, len(tokens), pos0, outputs_from))

    monkeypatch.setattr(bench, "decode_tokens", fake_decode)
    a, b = FakeSession("a", 2), FakeSession("b", 4)
    secs = bench.prefill_interleaved([a, b], [list(range(10))] * 2, 10, 3)
    assert calls == [("a", 2, 0, 2), ("a", 2, 2, 2), ("b", 4, 0, 4),
                     ("a", 2, 4, 2), ("a", 2, 6, 2), ("b", 4, 4, 4),
                     ("a", 2, 8, None), ("b", 2, 8, None)]
    assert len(secs) == 2 and min(secs) >= 0
    with pytest.raises(LorcError, match="divide the largest"):
        bench.prefill_interleaved([FakeSession("c", 3), b], [list(range(10))] * 2, 10, 3)


def test_bench_lorc_batch_runs_the_lorc_files_at_their_own_batch(pair, tmp_path):
    original, lorc = pair
    out = tmp_path / "bench.json"
    rc = bench_main([str(original), str(lorc), "--ctx", "64", "--repeats", "1", "--decode-tokens", "2",
                     "--cache-types", "", "--lorc-cache-types", "", "--interleave", "--batch", "16",
                     "--lorc-batch", "32", "--json", str(out), "-q", *THREADS])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [(c["label"], c["n_batch"]) for c in report["configs"]] == [("original", 16), ("lorc [ubatch 32]", 32)]
    assert [(r["config"], r["n_batch"]) for r in report["results"]] == [("original", 16), ("lorc [ubatch 32]", 32)]
    # every context's reserved compute buffers, read off llama.cpp's log
    assert all(r["compute_buffer_bytes"] > 0 for r in report["results"])


def test_bench_memory_reports_allocated_buffers_without_running(pair, tmp_path, capsys, monkeypatch):
    # --memory opens each context and reads llama.cpp's allocations: the original's KV buffer is its
    # f16 K and V of every cell (n_ctx x n_layer x 2 x D_KV x 2 bytes), the LoRC file's latent
    # store its ranks' f16 rows (this file has no exact store), and nothing is prefilled or decoded
    from lorc_gguf.evaluation import bench

    monkeypatch.setattr(bench, "decode_tokens", lambda *a, **k: pytest.fail("--memory decoded"))
    original, lorc = pair
    out = tmp_path / "memory.json"
    rc = bench_main([str(original), str(lorc), "--ctx", "4096,8192", "--cache-types", "", "--lorc-cache-types", "",
                     "--memory", "--json", str(out), "-q", *THREADS])
    assert rc == 0
    report = json.loads(out.read_text())
    by = {(r["config"], r["n_ctx"]): r for r in report["results"]}
    key_rank, value_rank = file_ranks(lorc)
    for n in (4096, 8192):
        # f16 rows of every cell; llama.cpp logs MiB to 2 decimals: each line within 0.005 MiB
        assert by[("original", n)]["kv_buffer_bytes"] == pytest.approx(n * N_LAYER * 2 * D_KV * 2, abs=0.005 * 2**20)
        assert by[("lorc", n)]["kv_buffer_bytes"] == pytest.approx(n * (sum(key_rank) + sum(value_rank)) * 2,
                                                                   abs=0.005 * 2**20)
        assert all(by[(c, n)]["compute_buffer_bytes"] > 0 for c in ("original", "lorc"))
    assert "KV + compute MiB @8192" in capsys.readouterr().out
    assert bench_main([str(original), str(lorc), "--ctx", "256", "--memory", "--plot", str(tmp_path / "m.png"),
                       "-q", *THREADS]) == 2


def test_bench_interleave_is_recorded(pair, tmp_path, capsys):
    original, lorc = pair
    out = tmp_path / "bench.json"
    rc = bench_main([str(original), str(lorc), "--ctx", "64", "--repeats", "2", "--decode-tokens", "2",
                     "--cache-types", "", "--lorc-cache-types", "", "--interleave", "--json", str(out), "-q",
                     *THREADS])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["decode_order"].startswith("interleaved")
    assert [len(r["decode_s"]) for r in report["results"]] == [2, 2]
    for r in report["results"]:
        assert [len(t) for t in r["decode_token_s"]] == [2, 2]
        assert sum(r["decode_token_s"][0]) == pytest.approx(r["decode_s"][0])
        assert r["decode_speedup"]["tokens"] == 4
        assert r["prefill_speedup"]["repeats"] == 2
    # the first config against itself: every pair is one token (one prefill) over itself
    assert report["results"][0]["decode_speedup"]["median"] == 1
    assert report["results"][0]["prefill_speedup"] == {"median": 1, "min": 1, "max": 1, "repeats": 2}
    # the second config's ratio is its own round's: the first config's seconds over its seconds
    first, second = report["results"]
    ratios = sorted(a / b for a, b in zip(first["prefill_s"], second["prefill_s"]))
    assert second["prefill_speedup"]["min"] == ratios[0] and second["prefill_speedup"]["max"] == ratios[1]
    assert "interleaved across configs" in capsys.readouterr().out


def test_paired_speedup_is_per_token_and_ignores_a_stall():
    # config b decodes every token in half the time of a, in the same round; the machine drifts
    # 3x slower over the repeat (both configs alike) and one of b's tokens stalls 100x: the ratio of
    # sums says b is ten times slower, the per-token median still 2x faster
    from lorc_gguf.evaluation.bench import paired_speedup

    drift = [1.0, 1.5, 2.0, 2.5, 3.0]
    a = [[d * 0.02 for d in drift]]
    b_tokens = [d * 0.01 for d in drift]
    b_tokens[2] *= 100
    got = paired_speedup(a, [b_tokens])
    assert got["median"] == pytest.approx(2.0) and got["tokens"] == 5
    assert got["q1"] == pytest.approx(2.0) and got["q3"] == pytest.approx(2.0)
    assert sum(a[0]) / sum(b_tokens) < 0.1


def test_paired_change_takes_its_error_over_batches_of_tokens():
    from lorc_gguf.evaluation.metrics import paired_change

    rng = np.random.default_rng(0)
    base = [rng.normal(3.0, 1.0, 256) for _ in range(2)]
    # a change of +0.01 nats on every token, plus noise that stays the same for 32 tokens at a time:
    # correlated differences, as a dropped cell moves every later token that attends it
    steps = [np.repeat(rng.normal(0, 0.1, 8), 32) for _ in range(2)]
    model = [b + 0.01 + s for b, s in zip(base, steps)]
    change, se = paired_change(base, model)
    mean_d = np.concatenate(steps).mean() + 0.01
    assert change == pytest.approx(math.expm1(mean_d), rel=1e-12)
    # 16 batches, each one noise value: the batch means' error is the noise's over 16 draws
    step_means = np.concatenate([x[::32] for x in steps])
    assert se == pytest.approx(math.exp(mean_d) * step_means.std(ddof=1) / 4, rel=1e-9)
    # the per-token formula would count 512 independent draws and understate the error ~5.7x
    _, token_se = paired_change(base, model, batch=1)
    assert token_se < se / 4
    with pytest.raises(ValueError):
        paired_change(base, [model[0]])


def test_runtime_settings_passed_are_recorded(pair, tmp_path):
    # results measured under run-time settings (a wider exact window, say) are not the file's
    # defaults: both tools write what was set, and nothing when nothing was; each model row has the
    # settings in effect
    original, lorc = pair
    common = ["--ctx", "64", "--json"]
    assert eval_main([str(lorc), "--chunks", "1", "--text", "docs", *common, str(tmp_path / "a.json"), "-q",
                         *THREADS]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["runtime_overrides"] == {}
    window = ["--lorc-recent-window", "16", "--lorc-prefill-block", "8"]
    assert eval_main([str(lorc), "--chunks", "1", "--text", "docs", *window, *common, str(tmp_path / "b.json"),
                         "-q", *THREADS]) == 0
    assert bench_main([str(original), str(lorc), "--repeats", "1", "--decode-tokens", "2", "--cache-types", "",
                       "--lorc-cache-types", "", *window, *common, str(tmp_path / "c.json"), "-q", *THREADS]) == 0
    for report, rows in (("b.json", "models"), ("c.json", "configs")):
        got = json.loads((tmp_path / report).read_text())
        assert got["runtime_overrides"] == {"lorc_recent_window": 16, "lorc_prefill_block": 8}
        assert [(r["lorc_sink_tokens"], r["lorc_recent_window"]) for r in got[rows]][-1] == (0, 16)
        assert got[rows][-1]["lorc_prefill_block"] == 8


def test_settings_reach_the_session_params(pair):
    # a run-time setting of the command line is a field of the context parameters each session opens
    # with (None there: the runtime's default)
    from lorc_gguf.evaluation.configs import make_config, with_settings

    _, lorc = pair
    settings = {"lorc_sink_tokens": 2, "lorc_recent_window": 16, "lorc_attend_rest": 0, "lorc_prefill_block": 8}
    params = with_settings([make_config(lorc)], settings)[0].params(64, 64, 1)
    assert {k: getattr(params, k) for k in settings} == settings
    assert make_config(lorc).params(64, 64, 1).lorc_prefill_block is None


def test_bench_convert_measures_stages_and_memory(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    from lorc_gguf.evaluation.convert_bench import bench_convert, format_bench_convert

    result = bench_convert("", tmp_path, model=tiny_llama_gguf, runs=("data-free", "numpy"), calib_tokens=64)
    assert [r["run"] for r in result["runs"]] == ["data-free", "numpy"]
    for r in result["runs"]:
        assert r["returncode"] == 0 and r["seconds"] > 0
        # a Python process with numpy loaded holds tens of MB of anonymous memory
        assert 10 * 2**20 < r["peak_anon_bytes"] < 4 * 2**30
        assert set(r["stages"]) == {"load", "spectra", "allocate", "calibration", "factorize and write"}
    assert result["runs"][0]["stages"]["calibration"] == 0 < result["runs"][1]["stages"]["calibration"]
    assert "| numpy |" in format_bench_convert(result)
    assert list(tmp_path.glob("*.gguf")) == []  # the converted files are removed


def test_shaped_gguf_has_the_real_shapes(tmp_path: Path) -> None:
    from lorc_gguf.format.read import open_gguf

    path = tmp_path / "8b.gguf"
    synth.make_shaped_gguf(path, "llama-3.1-8b", n_layer=1)
    sh = open_gguf(path).shape
    assert (sh.n_layer, sh.n_embd, sh.n_head, sh.n_head_kv, sh.head_dim_k) == (1, 4096, 32, (8,), 128)
    assert {int(x) for x in open_gguf(path).tensors["blk.0.ffn_up.weight"].shape} == {14336, 4096}


def test_defaults_study_rows(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    """Every calibration row scored on every text; each exact window read as its own context
    parameter (W = 8 and W = 48 must differ at ctx 64, where W = 48 keeps most cells exact)."""
    from lorc_gguf.evaluation import quality

    result = quality.defaults_study(tiny_llama_gguf, tmp_path, texts=("news", "docs"), n_chunks=1, ctx=64,
                                    sizes=(1024,), mixes=("docs only",), backends=("runtime",), windows=(8, 48),
                                    window_ctx=64, window_chunks=1)
    rows = result["calibration"]["rows"]
    assert [(r["mix"], r["tokens"], r["backend"]) for r in rows] == [
        ("all four", 1024, "numpy"), ("docs only", 16384, "numpy"), ("all four, runtime statistics", 16384, "runtime")]
    assert all(set(r["results"]) == {"news", "docs"} for r in rows)
    w8, w48 = (r["results"]["news"]["ppl"] for r in result["window"]["rows"])
    assert w8 != w48
    assert "| all four (docs, code, dialogue, encyclopedia; numpy) | 1024 |" in quality.format_defaults_study(result)
