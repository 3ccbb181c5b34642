"""`sleepbot demo --quick` end to end, as a user runs it: a real subprocess, real workers, real files."""

from __future__ import annotations

import json
import subprocess
import sys

from sleepbot.report import SECTIONS


def _demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sleepbot.cli", "demo", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = _demo("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("[1/4] collect", "[2/4] forecaster", "[3/4] compare", "[4/4] report"):
        assert stage in proc.stdout
    # The headline table, one line per arm, and the report's path.
    for arm in ("none", "schedulefree", "linear", "learned"):
        assert any(line.strip().startswith(arm + " ") for line in proc.stdout.splitlines()), arm
    assert f"report: {out / 'report.html'}" in proc.stdout
    page = (out / "report.html").read_text()
    assert all(f'<section id="{key}">' in page for key in SECTIONS)
    for fig in (
        "curves_digits-small_cnn-adam.png",
        "norms_none.png",
        "response_grid.png",
        "response.gif",
        "forecast.png",
    ):
        assert (out / "figures" / fig).stat().st_size > 1000, fig  # each drawn, none replaced by a note
    results = json.loads((out / "compare" / "results.json").read_text())
    w = results["workloads"]["digits-small_cnn-adam"]
    assert set(w["arms"]) == {"none", "schedulefree", "linear", "learned"}
    assert w["best_alternative"] == "schedulefree" and w["tuning"]["schedulefree"]["grid"]
    assert all(a["n"] == 2 for a in w["arms"].values()), results["errors"]
    assert min(results["config"]["seeds"]) >= 1000  # fresh seeds, not the collected ones
    learned = [r for r in results["runs"] if r["arm"] == "learned"]
    run = json.loads((out / "compare" / "runs" / f"{learned[0]['stem']}.json").read_text())
    assert run["config"]["sleep"]["options"]["forecaster"] == str((out / "forecaster.pt").resolve())
    assert any(e["strategy"] == "learned" for e in run["events"])


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    proc = _demo("--quick", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "not a sleepbot demo directory" in proc.stderr and proc.stderr.count("\n") == 1
    assert (tmp_path / "precious.txt").read_text() == "keep me"
