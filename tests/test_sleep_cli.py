"""`sleepbot sleep`, alone and `--vs` another strategy, at toy size."""

from __future__ import annotations

import json

from sleepbot.cli import main

TOY = ["--trainer.max_steps", "30", "--data.train_subset", "256", "--trainer.logger", "none"]


def test_sleep_single_run(tmp_path, capsys):
    sleep = ["--sleep.every_n_steps", "10", "--sleep.snapshot_every", "2"]
    rc = main(["sleep", "--strategy", "linear", *TOY, *sleep, "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[linear]: 30 steps" in out and "2/2 jumps accepted" in out


def test_sleep_vs_none_runs_through_compare_with_a_tuned_lr(tmp_path, capsys):
    out = tmp_path / "vs"
    argv = ["sleep", "--strategy", "noise", "--vs", "none", "--seeds", "2", "--workers", "1"]
    argv += ["--tune", "3e-3,1e-2", "--out", str(out), *TOY, "--sleep.every_n_steps", "10"]
    rc = main([*argv, "--sleep.options.alpha", "0.05"])
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    w = results["workloads"]["default"]
    assert list(w["arms"]) == ["none", "noise"]
    tuned = w["tuning"]["adam"]
    assert tuned["grid"] == [3e-3, 1e-2] and not set(tuned["seeds"]) & {0, 1}  # tuned on other seeds
    assert w["arms"]["noise"]["seeds"] == [0, 1] == w["arms"]["none"]["seeds"]
    assert w["arms"]["noise"]["accepted_sleeps"] == 2  # at steps 10 and 20, not 30 (the last)
    assert w["arms"]["noise"]["lr"] == tuned["lr"]
    ratio = w["arms"]["noise"]["speedup"]["ratio"]
    assert f"{ratio:.2f}x" in printed and "chosen on tuning seeds" in printed


def test_sleep_vs_at_an_untuned_lr_prints_no_speedup(tmp_path, capsys):
    out = tmp_path / "vs"
    argv = [
        "sleep",
        "--strategy",
        "noise",
        "--vs",
        "none",
        "--seeds",
        "1",
        "--workers",
        "1",
        "--tune",
        "none",
    ]
    assert main([*argv, "--out", str(out), *TOY, "--sleep.every_n_steps", "10"]) == 0
    printed = capsys.readouterr().out
    assert "lr NOT tuned" in printed and "no confidence interval" in printed
    table = printed[printed.index("arm ") :]
    assert "x [" not in table  # no speedup, and no interval from one seed


def test_sleep_cli_errors_are_one_line(capsys):
    assert main(["sleep", "--strategy", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sleepbot: error: unknown sleep.strategy 'nope'; valid:") and "\n" not in err
    assert main(["sleep", "--strategy", "learned", "--forecaster", "/nonexistent.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
