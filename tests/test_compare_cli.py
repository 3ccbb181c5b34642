"""`sleepbot compare` and `sleepbot sleep --vs` as a user runs them: exit codes, the overwrite rule, arms checked
before any run, and a strategy registered in a user's module usable by name from YAML."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from sleepbot.cli import main
from sleepbot.config import resolve_run_config
from sleepbot.sleep import SleepStrategy, register_strategy
from sleepbot.training import run_training


@register_strategy("test_shrink")
class Shrink(SleepStrategy):
    """Pull every weight toward zero (registered here, in a test module, and nowhere else)."""

    def __init__(self, factor: float = 0.99) -> None:
        self.factor = factor

    def propose(self, history, horizon, ctx):
        return history[-1] * self.factor


@register_strategy("test_broken")
class Broken(SleepStrategy):
    """Fails at its first jump: a run of it fails."""

    def propose(self, history, horizon, ctx):
        raise RuntimeError("broken on purpose")


SMALL = {
    "seeds": 1,
    "seed_start": 5,
    "base": {"data": {"name": "digits", "train_subset": 128}, "trainer": {"max_steps": 20}},
}


def _write(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_strategy_registered_in_a_test_module_runs_by_name_from_yaml(tmp_path):
    path = _write(
        tmp_path,
        {
            "data": {"name": "digits", "train_subset": 128},
            "trainer": {"max_steps": 20, "logger": "none", "progress_bar": False},
            "sleep": {
                "strategy": "test_shrink",
                "every_n_steps": 10,
                "context": 1,
                "options": {"factor": 0.5},
            },
            "out_dir": str(tmp_path),
        },
    )
    result = run_training(resolve_run_config(path))
    assert [e["step"] for e in result.events] == [10] and result.events[0]["accepted"]
    assert result.events[0]["rel_jump"] == pytest.approx(0.5, rel=1e-5)  # every weight halved


def test_a_strategy_by_import_path_runs_from_yaml(tmp_path):
    cfg = resolve_run_config(
        None,
        {
            "data": {"name": "digits", "train_subset": 128},
            "trainer": {"max_steps": 20, "logger": "none", "progress_bar": False},
            "sleep": {"strategy": "test_compare_cli.Shrink", "every_n_steps": 10, "context": 1},
            "out_dir": str(tmp_path),
        },
    )
    result = run_training(cfg)
    assert result.events[0]["strategy"] == "test_shrink" and result.events[0]["accepted"]
    with pytest.raises(Exception, match="could not be imported"):
        cfg.sleep.strategy = "nowhere.Nothing"
        run_training(cfg)


def test_compare_exits_1_when_runs_fail_and_names_the_failure(tmp_path, capsys):
    values = {
        **SMALL,
        "arms": ["none", {"name": "broken", "strategy": "test_broken", "every_n_steps": 10, "context": 1}],
    }
    out = tmp_path / "out"
    rc = main(["compare", "--config", str(_write(tmp_path, values)), "--out", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "1 run(s) failed" in captured.err and "broken on purpose" in captured.err
    results = json.loads((out / "results.json").read_text())
    assert len(results["errors"]) == 1 and results["workloads"]["default"]["arms"]["none"]["n"] == 1


def test_compare_checks_every_arm_before_any_run(tmp_path, capsys):
    values = {
        **SMALL,
        "arms": [
            "none",
            {
                "name": "far",
                "strategy": "learned",
                "horizon": 500,
            },  # beyond the shipped forecaster's horizons
        ],
    }
    out = tmp_path / "out"
    rc = main(["compare", "--config", str(_write(tmp_path, values)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("sleepbot: error: arm 'far':") and "\n" not in err
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # nothing trained
    values["arms"][1] = {"name": "bad", "strategy": "noise", "options": {"beta": 1}}
    assert main(["compare", "--config", str(_write(tmp_path, values)), "--out", str(out)]) == 2
    assert "no option 'beta'" in capsys.readouterr().err


def test_compare_report_and_markdown_obey_overwrite(tmp_path, capsys):
    values = copy.deepcopy(SMALL)
    values["arms"] = ["none"]
    path, out, md = _write(tmp_path, values), tmp_path / "out", tmp_path / "table.md"
    argv = ["compare", "--config", str(path), "--out", str(out), "--workers", "1", "--markdown", str(md)]
    assert main(argv) == 0
    before = md.read_text()
    assert "| none | adam (0.01) | 1 |" in before and "_Produced by `sleepbot compare" in before
    md.write_text("mine")
    assert main(argv) == 2  # an existing file is not overwritten without --overwrite
    assert "--markdown" in capsys.readouterr().err and md.read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0 and md.read_text() == before
    (out / "report.html").write_text("mine")
    assert main(["compare", "--config", str(path), "--out", str(out), "--report"]) == 2
    assert (out / "report.html").read_text() == "mine"


def test_train_json_is_not_overwritten(tmp_path, capsys):
    target = tmp_path / "r.json"
    target.write_text("keep")
    rc = main(["train", "--trainer.max_steps", "5", "--json", str(target), "--out_dir", str(tmp_path)])
    assert rc == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert target.read_text() == "keep"


def test_train_default_lr_is_the_tuned_one():
    assert resolve_run_config(None).model.lr == 1e-2  # configs/compare_digits.yaml's tuned lr for small_cnn
