"""The benchmark CLI (benchmarks/bench.py) at a toy grid: it runs, writes its JSON and PNG, and the
JSON has the documented fields. Correctness only: nothing here asserts on speed."""

import itertools
import json
import math
import statistics

import pytest
import torch

import lstm_fused

import bench  # benchmarks/, on sys.path (conftest.py)

TOY = ["--sizes", "4,2,6,5", "--headline", "4,2,6,5", "--warmup", "1", "--repeats", "2",
       "--min-repeats", "1", "--point-budget", "0.5"]

ROW_FIELDS = {"T", "B", "I", "H", "mode", "candidate", "kind", "variant", "status", "note",
              "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms", "repeats", "times_ms",
              "flops", "gflops", "pct_peak", "ratio_vs_nn", "check_max_abs_diff", "baseline"}
# a toy cell-step case: the LSTM cells and the GRU cells at one small H
TOY_CELL = ["--cell-sizes", "5", "--cell-calls", "3", "--cell-rounds", "2"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # without the torch.compile candidate (its compile dominates); see test_compiled_cell_*
    result = bench.main(TOY + TOY_CELL + ["--candidates",
                                          "nn,nn-native,fused,fused-aten,reference,gru",
                                          "--out", str(out)])
    return out, result


def test_writes_json_and_png(toy_run):
    out, result = toy_run
    assert (out / "bench.png").stat().st_size > 1000
    with open(out / "bench.json") as f:
        data = json.load(f)
    assert data["results"] == json.loads(json.dumps(result["results"]))
    meta = data["meta"]
    for key in ("torch", "threads", "device", "dtype", "sizes", "modes", "gemm_peak", "compile",
                "elapsed_s"):
        assert key in meta, key
    assert meta["threads"] == 2 and meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["gemm_peak"]["peak_gflops"] > 0


def test_every_candidate_and_mode_is_reported(toy_run):
    _, result = toy_run
    rows = result["results"]
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    kinds = {r["kind"] for r in rows}
    assert kinds == {"nn", "nn-native", "fused", "fused-aten", "reference", "nn-gru", "gru"}
    for mode in ("fwd", "fwdbwd"):
        variants = {r["variant"] for r in rows if r["kind"] == "fused" and r["mode"] == mode}
        assert variants == {"vanilla", "diagonal", "coupled", "diagonal+coupled", "full"}
        # the GRU: torch.nn.GRU and lstm_fused.GRU, in the same run
        gru = {r["candidate"]: r for r in rows if r["variant"] == "gru" and r["mode"] == mode}
        assert set(gru) == {"nn.GRU (ATen)", "fused GRU"}
        assert gru["fused GRU"]["kind"] == "gru" and gru["nn.GRU (ATen)"]["kind"] == "nn-gru"
    for r in rows:
        if r["status"] == "skipped":  # only "full" while the fused ops do not implement it
            assert r["variant"] == "full" and r["note"].startswith("skipped")
            continue
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert len(r["times_ms"]) == r["repeats"] >= 1
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
        assert r["gflops"] > 0 and math.isfinite(r["ratio_vs_nn"])
        assert r["flops"] == bench.gemm_flops(4, 2, 6, 5, r["variant"], 0, r["mode"])
        # every candidate computes the same function as the reference loop
        assert r["check_max_abs_diff"] < 1e-4, r


def test_ratio_is_the_median_of_same_round_ratios(toy_run):
    """ratio_vs_nn: each round's candidate time over nn.LSTM's time in that round, then the median
    (rounds saw the same machine noise, so they are compared pairwise); the GRU's over nn.GRU's."""
    _, result = toy_run
    rows = [r for r in result["results"] if r["status"] == "ok"]
    for mode, (base_kind, family) in itertools.product(
            ("fwd", "fwdbwd"), (("nn", lambda r: r["variant"] != "gru"),
                                ("nn-gru", lambda r: r["variant"] == "gru"))):
        [base] = [r for r in rows if r["kind"] == base_kind and r["mode"] == mode]
        assert base["ratio_vs_nn"] == 1.0 and base["baseline"] == base["candidate"]
        others = [r for r in rows if r["kind"] != base_kind and r["mode"] == mode and family(r)]
        assert others
        for r in others:
            assert r["baseline"] == base["candidate"]
            assert len(r["times_ms"]) == len(base["times_ms"])
            pairs = zip(r["times_ms"], base["times_ms"])
            expected = statistics.median(ours / theirs for ours, theirs in pairs)
            assert r["ratio_vs_nn"] == pytest.approx(expected, rel=1e-12), r["candidate"]


def test_gemm_flops():
    # forward 2*T*B*(I+R)*G*H; coupled and the GRU have 3 gate blocks; fwd+bwd = 3x forward
    assert bench.gemm_flops(100, 64, 256, 256) == 2 * 100 * 64 * 512 * 4 * 256
    assert bench.gemm_flops(1, 1, 2, 3, "coupled") == 2 * 5 * 3 * 3
    assert bench.gemm_flops(1, 1, 2, 3, "gru") == 2 * 5 * 3 * 3
    assert bench.gemm_flops(1, 1, 2, 3, "gru", mode="fwdbwd") == 3 * 2 * 5 * 3 * 3
    assert bench.gemm_flops(1, 1, 2, 3, mode="fwdbwd") == 3 * bench.gemm_flops(1, 1, 2, 3)
    assert bench.gemm_flops(1, 1, 2, 4, proj=2) == 2 * 4 * 4 * 4 + 2 * 4 * 2
    assert bench.gemm_flops(1, 1, 2, 3, "full") == 2 * 5 * 4 * 3 + 2 * 3 * 3 * 3


def test_cli_arguments_are_validated(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "1,2,3"])
    assert "T,B,I,H" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variants", "vanilla,nope"])
    assert "unknown" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_device_cuda_errors_clearly_without_cuda(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err
    assert not (tmp_path / "bench.json").exists()


def test_loop_layer_matches_reference_layer():
    """The compiled-cell candidate's Python time loop, here around the eager cell."""
    from conftest import make_params

    from lstm_fused import reference

    g = torch.Generator().manual_seed(0)
    for peephole, coupled in bench.VARIANTS.values():
        params = make_params(3, 4, peephole=peephole, coupled=coupled, generator=g)
        x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
        h0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
        c0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
        for reverse in (False, True):
            kw = {"peephole": peephole, "coupled": coupled, "reverse": reverse}
            out, (h, c) = bench.make_loop_layer(reference.lstm_cell)(x, h0, c0, *params, **kw)
            ref, (h_ref, c_ref) = reference.lstm_layer(x, h0, c0, *params, **kw)
            torch.testing.assert_close(out, ref)
            torch.testing.assert_close(h, h_ref)
            torch.testing.assert_close(c, c_ref)
    # the options lstm_fused.LSTM passes its layer function: off (as it passes them by default),
    # and a cell clip on
    params = make_params(3, 4, generator=g)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    h0, c0 = (torch.randn(2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for options in ({"cell_clip": 0.0, "proj_clip": 0.0, "zoneout": None},
                    {"cell_clip": 0.3, "proj_clip": 0.0, "zoneout": None}):
        out, (h, c) = bench.make_loop_layer(reference.lstm_cell)(x, h0, c0, *params, **options)
        ref, (h_ref, c_ref) = reference.lstm_layer(x, h0, c0, *params, **options)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(c, c_ref)
    assert c.abs().max() <= 0.3


def test_compiled_candidate_runs_through_the_module():
    """The compiled-cell candidate as build_candidates makes it: lstm_fused.LSTM with the loop
    layer swapped in (the module passes its clip and zoneout options to the layer function)."""
    from lstm_fused import reference

    m = lstm_fused.LSTM(3, 4, peephole="diagonal")
    ref = lstm_fused.LSTM(3, 4, peephole="diagonal")
    ref.load_state_dict(m.state_dict())
    m._layer_fn = bench.make_loop_layer(reference.lstm_cell)
    ref._layer_fn = reference.lstm_layer
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(m(x)[0], ref(x)[0])


@pytest.mark.slow
def test_compiled_cell_falls_back_to_aot_eager_on_timeout():
    """An inductor compile over --compile-timeout is abandoned for aot_eager, and labelled."""
    cell, label, info = bench.prepare_compiled_cell("inductor", ["diagonal"], torch.device("cpu"),
                                                    torch.float32, timeout=0.01)
    assert info["backend"] == "aot_eager" and "fallback" in label
    assert "_Timeout" in info["fallback_reason"]
    out, _ = bench.make_loop_layer(cell)(
        torch.randn(3, 2, 4), torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(20, 4),
        torch.randn(20, 5), None, None, torch.randn(3, 5), None, peephole="diagonal",
        coupled=False)
    assert out.shape == (3, 2, 5)


def test_variants_without_vanilla_check_nn_lstm_against_a_fused_twin(tmp_path):
    """--variants without vanilla: torch's module (vanilla) is still checked against the reference,
    through a fused twin with its weights."""
    result = bench.main(TOY + ["--candidates", "nn,fused", "--variants", "coupled,full",
                               "--cell-sizes", "", "--out", str(tmp_path)])
    nn_rows = [r for r in result["results"] if r["kind"] == "nn"]
    assert nn_rows and all(r["check_max_abs_diff"] < 1e-5 for r in nn_rows)
    assert {r["variant"] for r in result["results"] if r["kind"] == "fused"} == {"coupled", "full"}


@pytest.mark.parametrize("mode, op", [("fwd", "lstm_fused::layer_forward"),
                                      ("fwdbwd", "lstm_fused::layer_backward")])
def test_profile_layer_prints_the_operator_table(mode, op, capsys):
    import profile_layer

    table = profile_layer.main(["--variant", "full", "--mode", mode, "--size", "3,2,4,5",
                                "--calls", "1"])
    assert op in table and "Self CPU" in table
    assert "full, " + mode in capsys.readouterr().out


def test_profile_layer_rejects_a_bad_size(capsys):
    import profile_layer

    with pytest.raises(SystemExit):
        profile_layer.main(["--size", "1,2,3"])
    assert "T,B,I,H" in capsys.readouterr().err


def test_batch_sweep_reports_every_batch_size_variant_and_mode(tmp_path):
    """--batch-sweep at a toy shape: nn.LSTM and every fused variant at each batch size, both
    modes; the markdown table has one row per batch size with a ratio per (mode, variant) and the
    recurrent GEMM path; the ratio-vs-batch plot is written where --sweep-plot says."""
    plot = tmp_path / "sweep.png"
    result = bench.main(["--batch-sweep", "--sweep-shape", "3,6,5", "--sweep-batches", "1,2,3",
                         "--headline", "3,2,6,5", "--warmup", "1", "--repeats", "2",
                         "--min-repeats", "1", "--point-budget", "0.2", "--sweep-plot", str(plot),
                         "--out", str(tmp_path)])
    rows = result["results"]
    assert {r["kind"] for r in rows} == {"nn", "fused"}  # the sweep's default candidates
    assert not result["cell_latency"]
    assert {(r["T"], r["I"], r["H"]) for r in rows} == {(3, 6, 5)}
    for B in (1, 2, 3):
        for mode in ("fwd", "fwdbwd"):
            variants = {r["variant"] for r in rows
                        if (r["B"], r["mode"], r["kind"]) == (B, mode, "fused")}
            assert variants == set(bench.VARIANTS), (B, mode)
    table = (tmp_path / "batch-sweep.md").read_text().strip().splitlines()
    assert table[-5].startswith("| B | vanilla fwd |") and "full fwd+bwd" in table[-5]
    for B, line in zip((1, 2, 3), table[-3:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == str(B) and len(cells) == 2 + 2 * len(bench.VARIANTS)
        ratio = bench.sweep_ratio(rows, B, "fwdbwd", "full")
        assert cells[-2] == f"{ratio:.2f}"
        assert set(cells[-1].split("/")) <= {*lstm_fused.cpu_gemm.MODES, "-"}, cells[-1]
    assert plot.stat().st_size > 1000
    assert result["meta"]["grid"] == "batch-sweep"


def test_batch1_spread_runs_separate_processes(tmp_path):
    import batch1_spread

    result = batch1_spread.main(["--processes", "2", "--size", "3,1,6,5", "--repeats", "2",
                                 "--variants", "vanilla,coupled", "--out", str(tmp_path)])
    assert set(result["variants"]) == {"vanilla", "coupled"}
    for entry in result["variants"].values():
        assert len(entry["ratios"]) == len(entry["paths"]) == 2
        assert entry["min"] <= entry["median"] <= entry["max"]
    assert (tmp_path / "process0" / "bench.json").exists()
    assert (tmp_path / "process1" / "bench.json").exists()
    assert "2 separate processes" in result["text"]


def test_gemm_paths_reports_each_path_by_batch_size(capsys):
    import gemm_paths

    rows = gemm_paths.main(["--batches", "1,5", "--hidden", "8", "--steps", "3", "--rounds", "2"])
    assert [r["B"] for r in rows] == [1, 5]
    for r in rows:
        assert r["chosen"] in lstm_fused.cpu_gemm.MODES and r["fused_us"] > 0 and r["nn_us"] > 0
        assert set(r["gemm_us"]) <= set(lstm_fused.cpu_gemm.available(torch.float32))
    assert "nn.LSTM" in capsys.readouterr().out


def test_gemm_paths_reports_the_backward_gemm_paths(capsys):
    import gemm_paths

    rows = gemm_paths.main(["--weight-gradients", "--batches", "2,9", "--hidden", "8",
                            "--steps", "5", "--measurements", "2"])
    assert [(r["B"], r["rows"]) for r in rows] == [(2, 10), (2, 10), (9, 45), (9, 45)]
    available = set(lstm_fused.cpu_gemm.available(torch.float32))
    for r, (label, _) in zip(rows, gemm_paths.BACKWARD_GEMMS * 2):
        assert r["gemm"] == label
        # (MKL's packed GEMM is for repeated GEMMs only)
        candidates = {"aten", "simd"} & available if "weight" in label else available - {"packed"}
        assert set(r["ms"]) == candidates and all(v > 0 for v in r["ms"].values()), r
        if "simd" in candidates:
            assert r["ratio"] == pytest.approx(r["ms"]["simd"] / r["ms"]["aten"])
    assert "simd/aten" in capsys.readouterr().out


def test_batch_sweep_with_the_input_gradient(tmp_path, monkeypatch):
    """--input-grad: the input of the forward+backward requires grad (both candidates compute its
    gradient, which each round clears), and the table says so."""
    seen = []
    real = bench.run_point

    def spy(args, size, mode, cands, timer, peak):
        for c in cands:
            if c.module is not None:
                c.module.register_forward_pre_hook(
                    lambda module, inputs: seen.append(inputs[0].requires_grad))
        return real(args, size, mode, cands, timer, peak)

    monkeypatch.setattr(bench, "run_point", spy)
    result = bench.main(["--batch-sweep", "--sweep-shape", "3,6,5", "--sweep-batches", "2",
                         "--modes", "fwdbwd", "--variants", "vanilla", "--input-grad",
                         "--headline", "3,2,6,5", "--warmup", "1", "--repeats", "2",
                         "--min-repeats", "1", "--point-budget", "0.2", "--out", str(tmp_path)])
    assert seen and all(seen)  # every timed forward (nn.LSTM's and ours) got such an input
    assert result["meta"]["input_grad"] is True
    assert "with the input gradient" in (tmp_path / "batch-sweep.md").read_text()


def test_cell_step_case_times_the_gru_cells_against_nn_grucell(toy_run):
    """The batch-1 cell-step case: nn.LSTMCell and our LSTM cells, nn.GRUCell and our GRUCell, in
    the same rounds; each ratio against its own torch cell."""
    _, result = toy_run
    cells = {r["candidate"]: r for r in result["cell_latency"]}
    assert set(cells) == {"nn.LSTMCell", "fused vanilla", "fused diagonal", "nn.GRUCell",
                          "fused GRUCell"}
    for name, r in cells.items():
        assert r["H"] == 5 and r["B"] == 1 and r["rounds"] == 2 and r["calls_per_round"] == 3
        assert r["baseline"] == ("nn.GRUCell" if "GRU" in name else "nn.LSTMCell")
        assert r["min_us"] <= r["us_per_step"] <= r["max_us"]
        assert r["ratio_vs_nn"] > 0 and math.isfinite(r["ratio_vs_nn"])
    assert cells["nn.GRUCell"]["ratio_vs_nn"] == cells["nn.LSTMCell"]["ratio_vs_nn"] == 1.0
    assert "fused GRUCell" in bench.format_cell_latency(result["cell_latency"])


def test_gru_targets_read_the_gru_rows():
    """The GRU targets of issue 24 (vs nn.GRU / nn.GRUCell) are in the targets table and read the
    fused GRU's rows at the headline size and batch 1, and the GRUCell step at H=256."""
    rows = [{"T": 100, "B": B, "I": 256, "H": 256, "mode": mode, "candidate": "fused GRU",
             "status": "ok", "ratio_vs_nn": ratio, "ratio_of_mins": ratio}
            for B, mode, ratio in ((64, "fwdbwd", 0.85), (64, "fwd", 1.05), (1, "fwd", 0.9))]
    cell_rows = [{"H": 256, "candidate": "fused GRUCell", "ratio_vs_nn": 0.5,
                  "ratio_of_mins": 0.5}]
    targets = {t["what"]: t for t in bench.target_rows(rows, cell_rows)}
    gru = {what: (t["ratio"], t["target"], t["met"]) for what, t in targets.items()
           if "GRU" in what}
    assert gru == {
        "GRU vs nn.GRU, T=100 B=64 I=H=256, forward+backward": (0.85, 0.90, True),
        "GRU vs nn.GRU, same size, forward under no_grad": (1.05, 1.00, False),
        "GRU vs nn.GRU, batch 1 (T=100, I=H=256), forward": (0.9, 1.00, True),
        "one GRUCell step, batch 1, H=256 (inference_mode, 1 thread), vs nn.GRUCell":
            (0.5, 0.70, True),
    }
    assert all(t["met"] is None for what, t in targets.items() if "GRU" not in what)
    assert "GRUCell step" in bench.format_targets(list(targets.values()))


def test_gru_is_skipped_with_a_note_under_proj_size(tmp_path):
    """nn.GRU has no projection: with --proj-size the GRU is listed as skipped, the LSTMs run."""
    result = bench.main(TOY + ["--candidates", "nn,gru", "--proj-size", "3", "--cell-sizes", "",
                               "--modes", "fwd", "--out", str(tmp_path)])
    rows = {r["candidate"]: r for r in result["results"]}
    assert set(rows) == {"nn.LSTM (oneDNN)", "fused GRU"}
    assert rows["nn.LSTM (oneDNN)"]["status"] == "ok"
    assert rows["fused GRU"]["status"] == "skipped" and "proj" in rows["fused GRU"]["note"]
