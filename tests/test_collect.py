"""`sleepbot collect` and `sleepbot inspect`: the grid, shards, resuming after a killed collect, the summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sleepbot.cli import main
from sleepbot.errors import ConfigError
from sleepbot.experiments import collect, collect_grid, collect_summary, load_collect_config, parse_shard
from sleepbot.store import RunFile, StoreError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_name_their_runs():
    sizes = {}
    for name in ("collect_quick", "collect_digits", "collect_mnist1d"):
        cfg = load_collect_config(ROOT / "configs" / f"{name}.yaml")
        grid = collect_grid(cfg, "out")
        sizes[name] = len(grid)
        assert len({r["name"] for r in grid}) == len(grid)
        for r in grid:
            assert r["config"]["record"]["enabled"] and r["config"]["record"]["path"] == f"out/{r['file']}"
    assert sizes == {"collect_quick": 4, "collect_digits": 36, "collect_mnist1d": 9}
    digits = collect_grid(load_collect_config(ROOT / "configs/collect_digits.yaml"), "out")
    assert {r["config"]["model"]["arch"] for r in digits} == {"small_cnn", "lenet5", "mlp"}
    assert all(r["config"]["trainer"]["max_steps"] == 600 for r in digits)


def test_shards_partition_the_grid(tmp_path):
    grid = [
        r["name"] for r in collect_grid(load_collect_config(ROOT / "configs/collect_digits.yaml"), tmp_path)
    ]
    parts = [grid[k - 1 :: 5] for k in range(1, 6)]
    assert sorted(sum(parts, [])) == sorted(grid) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) == (1, 1)
    for bad in ("0/5", "6/5", "two/5", "3"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_bad_collect_configs_fail_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="unknown collect config key 'arch'"):
        load_collect_config(_write(tmp_path, "arch: [small_cnn]\n"))
    with pytest.raises(ConfigError, match="unknown model.arch 'alexnet'"):
        load_collect_config(_write(tmp_path, "archs: [small_cnn, alexnet]\n"))
    with pytest.raises(ConfigError, match="'lrs' must be a list of float"):
        load_collect_config(_write(tmp_path, "lrs: [fast]\n"))
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_step'"):
        load_collect_config(_write(tmp_path, "run: {trainer: {max_step: 5}}\n"))


def test_a_run_that_fails_is_reported_and_others_go_on(tmp_path):
    cfg = load_collect_config(
        _write(
            tmp_path,
            "datasets: [mnist, digits]\narchs: [mlp]\nrun: {trainer: {max_steps: 5}, data: {train_subset: 64}}\n",
        )
    )
    rows = collect(cfg, tmp_path / "out", workers=1, progress=False)
    assert [r.status for r in rows] == ["failed", "trained"]
    assert "torchvision" in rows[0].note
    assert "1 failed" in collect_summary(rows, tmp_path / "out")


_GRID = """
datasets: [digits]
archs: [mlp]
optimizers: [adam]
lrs: [3.0e-3]
seeds: [0, 1, 2]
run:
  data: {train_subset: 256}
  trainer: {max_steps: 60, val_every_n_steps: 30}
  record: {snapshot_every: 10}
"""


@pytest.mark.slow
def test_collect_resumes_after_being_killed(tmp_path):
    config = _write(tmp_path, _GRID)
    out = tmp_path / "out"
    files = [out / f"digits-mlp-adam-lr0.003-s{s}.h5" for s in range(3)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sleepbot.cli",
            "collect",
            "--config",
            str(config),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # kill it while the second run is being written, after the first completed
            if _status(files[1]) == "running" and _status(files[0]) == "complete":
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert _complete(files[0]) and files[1].exists() and not _complete(files[1])
    with RunFile(files[1]) as run:
        assert run.status == "running"
    first = (files[0].stat().st_mtime_ns, RunFile(files[0]).attrs["created"])

    rows = collect(config, out, workers=1, progress=False)
    assert [(r.status, r.note.split(" (")[0]) for r in rows] == [
        ("skipped", "complete already"),
        ("trained", "redone"),
        ("trained", ""),
    ]
    assert "its writer (pid" in rows[1].note
    assert all(_complete(f) for f in files)
    assert (files[0].stat().st_mtime_ns, RunFile(files[0]).attrs["created"]) == first  # never touched
    with RunFile(files[1]) as run:
        assert len(run.steps) == 61 and list(run.snapshot_steps) == list(range(0, 61, 10))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["name"] for r in manifest["runs"]] == [f.stem for f in files]

    again = collect(config, out, workers=1, progress=False)
    assert [r.status for r in again] == ["skipped"] * 3
    # the same directory with another grid is refused (nothing is overwritten without --overwrite)
    other = tmp_path / "other.yaml"
    other.write_text(_GRID.replace("max_steps: 60", "max_steps: 50"))
    with pytest.raises(ConfigError, match="holds a different collection"):
        collect(other, out, workers=1, progress=False)


def _status(path: Path) -> str | None:
    try:
        with RunFile(path) as run:
            return run.status
    except StoreError:
        return None


def _complete(path: Path) -> bool:
    return _status(path) == "complete"


def test_inspect_prints_a_file_and_a_directory(tmp_path, capsys):
    from sleepbot.recording import RecorderCore

    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 3, 5), torch.nn.Flatten(), torch.nn.Linear(3 * 12, 4))
    (tmp_path / "runs").mkdir()
    for seed, status in ((0, "complete"), (1, "failed")):
        with RecorderCore(
            tmp_path / "runs" / f"r{seed}.h5", model, attrs={"dataset": "toy", "seed": seed}
        ) as core:
            for step in range(21):
                core.record_step(step, loss=1.0 / (step + 1), lr=0.01)
            core.log_val(20, 0.5, 0.75)
            core.log_event(10, "linear", 5, True, 1.0, 0.9)
            if status == "failed":
                core.close("failed")
    (tmp_path / "runs" / "junk.h5").write_bytes(b"not hdf5")

    assert main(["inspect", str(tmp_path / "runs" / "r0.h5")]) == 0
    text = capsys.readouterr().out
    for expected in (
        "status    complete",
        "T=21 steps (0..20)",
        "S=3 snapshots",
        "conv1d",
        "3x1x5",
        "events    1",
    ):
        assert expected in text
    assert "val       1 points (20..20); last acc 0.7500" in text

    assert main(["inspect", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "r0.h5" in text and "r1.h5" in text and "failed" in text
    assert "2 runs (1 complete, 1 failed)" in text and "unreadable: junk.h5" in text

    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_collect_cli_rejects_bad_shard(tmp_path, capsys):
    code = main(
        [
            "collect",
            "--config",
            str(ROOT / "configs/collect_quick.yaml"),
            "--out",
            str(tmp_path),
            "--shard",
            "3/2",
        ]
    )
    assert code == 2 and "need 1 <= K <= N" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_curves_do_not_depend_on_the_worker_count(tiny_config):
    # A run trained with 2 torch threads drifts from its 1-thread twin within a few dozen steps (MKL splits the
    # Linear layer's weight gradient by thread count), so this fails if the in-process path (workers=1) kept this
    # process's 2 threads while the workers use 1.
    import torch

    from sleepbot.experiments import run_parallel, train_task

    tiny_config.trainer.max_steps = 60
    tasks = []
    for seed in (0, 1):
        tiny_config.seed = seed
        tasks.append({"config": tiny_config.to_dict()})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        serial = run_parallel(train_task, tasks, workers=1, progress=False)
        assert torch.get_num_threads() == 2  # restored after the tasks
        pooled = run_parallel(train_task, tasks, workers=2, progress=False)
    finally:
        torch.set_num_threads(before)
    for (ok_s, s), (ok_p, p) in zip(serial, pooled):
        assert ok_s and ok_p, (s, p)
        assert s["val_step"] == p["val_step"] and s["val_acc"] == p["val_acc"]
        assert s["val_loss"] == p["val_loss"]  # bit for bit


def test_groups_give_each_optimizer_its_own_axes_and_clashes_are_refused(tmp_path):
    cfg = load_collect_config(
        _write(
            tmp_path,
            """
run: {trainer: {max_steps: 40}}
_archs: &archs [mlp, small_cnn]
groups:
  - {name: a, archs: *archs, optimizers: adam, lrs: [1.0e-3, 1.0e-2], batch_sizes: [32, 128], budgets: 30}
  - {name: c, archs: mlp, optimizers: adam, lrs: 1.0e-2, run: {model: {schedule: cosine}}, seeds: [5, 6]}
""",
        )
    )
    grid = collect_grid(cfg, "out")
    assert len(grid) == 2 * 2 * 2 + 2
    first = grid[0]
    assert first["name"] == "a-digits-mlp-adam-lr0.001-b32-n30-s0"
    assert first["config"]["data"]["batch_size"] == 32 and first["config"]["trainer"]["max_steps"] == 30
    cos = [r for r in grid if r["name"].startswith("c-")]
    assert [r["config"]["seed"] for r in cos] == [5, 6]
    assert all(r["config"]["model"]["schedule"] == "cosine" for r in cos)
    assert all(r["config"]["trainer"]["max_steps"] == 40 for r in cos)  # the top-level run, not group a's
    assert {r["config"]["model"]["schedule"] for r in grid if r["name"].startswith("a-")} == {"constant"}
    with pytest.raises(ConfigError, match="both make run"):
        load_collect_config(_write(tmp_path, "groups:\n  - {lrs: 1.0e-3}\n  - {lrs: [1.0e-3, 1.0e-2]}\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'lr' in collect config groups\[0\]"):
        load_collect_config(_write(tmp_path, "groups:\n  - {lr: 1.0e-3}\n"))
    with pytest.raises(ConfigError, match="batch_sizes"):
        load_collect_config(_write(tmp_path, "groups:\n  - {batch_sizes: [0]}\n"))


def test_the_meta_corpus_spans_what_users_run():
    grid = collect_grid(load_collect_config(ROOT / "configs/collect_meta.yaml"), "out")
    cfgs = [r["config"] for r in grid]
    assert len(grid) >= 200 and len({r["name"] for r in grid}) == len(grid)
    assert {c["data"]["name"] for c in cfgs} == {"digits", "mnist1d"}
    assert {c["data"]["batch_size"] for c in cfgs} == {32, 128}
    assert {c["model"]["optimizer"] for c in cfgs} >= {
        "adam",
        "adamw",
        "sgd",
        "momentum",
        "schedulefree_adamw",
    }
    assert {c["model"]["schedule"] for c in cfgs if c["model"]["optimizer"] == "adam"} == {
        "constant",
        "cosine",
    }
    assert len({c["trainer"]["max_steps"] for c in cfgs}) >= 4
    # The held-out pieces stay out: the SGD+momentum workload's arch, and every compare seed.
    assert "cnn3" not in {c["model"]["arch"] for c in cfgs}
    assert not {c["seed"] for c in cfgs} & set(range(900, 1100))
