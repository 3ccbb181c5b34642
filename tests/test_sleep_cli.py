"""`sleepbot sleep` and scripts/sleep_tables.py, run at toy size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sleepbot.cli import main

TOY = ["--trainer.max_steps", "30", "--data.train_subset", "256", "--trainer.logger", "none"]


def test_sleep_single_run(tmp_path, capsys):
    sleep = ["--sleep.every_n_steps", "10", "--sleep.snapshot_every", "2"]
    rc = main(["sleep", "--strategy", "linear", *TOY, *sleep, "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[linear]: 30 steps" in out and "2/2 jumps accepted" in out


def test_sleep_vs_none_pairs_seeds(tmp_path, capsys):
    path = tmp_path / "arms.json"
    argv = [
        "sleep",
        "--strategy",
        "noise",
        "--vs",
        "none",
        "--seeds",
        "2",
        "--workers",
        "1",
        "--json",
        str(path),
    ]
    rc = main([*argv, *TOY, "--sleep.every_n_steps", "10", "--sleep.options.alpha", "0.05"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 seeds per arm" in out and "(median final of none)" in out
    summary = json.loads(path.read_text())
    assert set(summary["arms"]) == {"noise", "none"}
    assert summary["arms"]["noise"]["seeds"] == [0, 1] == summary["arms"]["none"]["seeds"]
    assert summary["arms"]["noise"]["accepted"] == 4  # 2 sleeps (10, 20; not 30, the last) x 2 seeds
    assert summary["arms"]["none"]["speedup"] == 1.0
    # the baseline reaches its own median final accuracy within the budget in at least one seed
    assert min(summary["arms"]["none"]["steps_to_target"]) <= 30


def test_sleep_cli_errors_are_one_line(capsys):
    assert main(["sleep", "--strategy", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sleepbot: error: unknown sleep.strategy 'nope'; valid:") and "\n" not in err
    assert main(["sleep", "--strategy", "learned", "--forecaster", "/nonexistent.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err


def test_sleep_tables_script_at_toy_size(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import sleep_tables
    finally:
        sys.path.pop(0)
    # one seed: 2 grid runs, then linear at the tuned and the untuned lr (none's runs come from the grid)
    argv = ["tables", "--quick", "--seeds", "1", "--workers", "1", "--workload", "digits"]
    argv += ["--out", str(tmp_path)]
    argv += ["--lr-grid", "0.001", "0.01", "--arm", "linear:every_n_steps=10,snapshot_every=2"]
    assert sleep_tables.main(argv) == 0
    report = json.loads((tmp_path / "sleep_tables.json").read_text())
    entry = report["workloads"]["digits"]
    assert entry["tuned_lr"] in report["lr_grid"] and report["seeds"] == [1000]
    assert set(entry["tuned"]["arms"]) == {"none", "linear:every_n_steps=10,snapshot_every=2"}
    assert entry["tuned"]["arms"]["linear:every_n_steps=10,snapshot_every=2"]["accepted"] == 2
    assert entry["untuned"]["lr"] == 1e-3
    md = (tmp_path / "sleep_tables.md").read_text()
    assert "digits, tuned lr" in md and "digits, untuned lr 0.001" in md


def test_shipped_sleep_configs_build_a_sleep_callback():
    import pytest

    from sleepbot.config import resolve_run_config
    from sleepbot.errors import SleepbotError
    from sleepbot.forecast import DEFAULT_PATH
    from sleepbot.sleep import sleep_from_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("sleep_*.yaml"))
    assert {p.stem for p in paths} >= {"sleep_linear", "sleep_learned", "sleep_lookahead", "sleep_noise"}
    for path in paths:
        cfg = resolve_run_config(path)
        if cfg.sleep.strategy == "learned" and not DEFAULT_PATH.is_file():
            with pytest.raises(SleepbotError, match="default forecaster"):
                sleep_from_config(cfg)
            continue
        cb = sleep_from_config(cfg)
        assert cb.strategy.name == cfg.sleep.strategy
