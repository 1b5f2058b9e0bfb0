"""The precise-timing demo runs end to end at toy size and writes what it promises."""

import json

import pytest
import torch

import lstm_fused

import demo  # examples/, on sys.path (conftest.py)


def test_timed_spikes_places_trigger_and_target_delay_apart():
    x, y, t0 = demo.timed_spikes(8, 20, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (20, 8, 1)
    assert torch.equal(x.argmax(0).squeeze(-1), t0)
    assert torch.equal(y.argmax(0).squeeze(-1), t0 + 7)
    assert x.sum() == y.sum() == 8


def test_score_counts_only_exact_single_spikes():
    y = torch.zeros(5, 3, 1)
    y[2, :, 0] = 1
    logits = torch.full((5, 3, 1), -1.0)
    logits[2, 0, 0] = 1.0                        # exact
    logits[3, 1, 0] = 1.0                        # one step late
    logits[2, 2, 0] = logits[4, 2, 0] = 1.0      # right, plus a spurious spike
    scores = demo.score(logits, y)
    assert abs(scores["correct"] - 1 / 3) < 1e-6


def test_demo_runs_at_toy_size_and_writes_results(tmp_path, capsys):
    demo.main(["--quick", "--steps", "4", "--eval-every", "2", "--n-test", "16",
               "--length", "12", "--delay", "5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| vanilla |" in printed and "| GRU |" in printed
    assert (tmp_path / "demo.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "criterion" in results and results["config"]["steps"] == 4
    assert list(results["variants"]) == ["vanilla", "peephole", "coupled", "peephole+coupled",
                                         "GRU"]
    for summary in results["variants"].values():
        for field in ("n_params", "success_rate", "seq_error_mean", "seq_error_std",
                      "seq_error_median", "timing_error_mean", "sequences_per_s", "runs"):
            assert field in summary
        assert 0.0 <= summary["success_rate"] <= 1.0 and summary["sequences_per_s"] > 0
    params = {name: s["n_params"] for name, s in results["variants"].items()}
    assert params["coupled"] < params["vanilla"] < params["peephole"]
    # the GRU, like the coupled LSTM, has 3 gate blocks of the vanilla LSTM's 4 (same hidden size)
    assert params["GRU"] == params["coupled"]
    assert isinstance(demo.SpikeTimer(16, **demo.VARIANTS["GRU"]).rnn, lstm_fused.GRU)
    assert isinstance(demo.SpikeTimer(16, **demo.VARIANTS["coupled"]).rnn, lstm_fused.LSTM)


def test_demo_variants_option_runs_a_subset(tmp_path):
    summary = demo.main(["--quick", "--steps", "2", "--eval-every", "2", "--n-test", "8",
                         "--length", "10", "--delay", "4", "--variants", "GRU,vanilla",
                         "--out", str(tmp_path)])
    assert list(summary) == ["vanilla", "GRU"]  # the study's order
    with pytest.raises(SystemExit):
        demo.parse_args(["--variants", "lstm"])


@pytest.mark.parametrize("variant", ["peephole+coupled", "GRU"])
def test_demo_is_deterministic_given_the_seed(variant):
    cfg = demo.Config(seeds=1, steps=3, eval_every=3, n_test=8, length=10, delay=4)
    test = demo.timed_spikes(8, 10, 4, torch.Generator().manual_seed(1))[:2]
    first = demo.train_one(variant, 0, cfg, test)
    second = demo.train_one(variant, 0, cfg, test)
    assert first["curve"] == second["curve"]
