"""The HDF5 run format: a chunked, buffered writer checked against in-memory arrays, and the reader's errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from sleepbot.store import (
    CHUNK_BYTES,
    SCHEMA_VERSION,
    LayerSpec,
    RunFile,
    RunWriter,
    StoreError,
    TrajectoryStore,
    _weight_chunks,
)


def _specs(max_kept: int | None = None) -> list[LayerSpec]:
    """Layer names chosen so that alphabetical order differs from definition order."""
    specs = [
        LayerSpec("net.2", "conv2d", (6, 1, 3, 3), True, np.arange(6)),
        LayerSpec("net.10", "linear", (5, 7), False, np.arange(5)),
    ]
    if max_kept:
        specs[0].neurons = np.array([1, 4])
    return specs


def _write_reference(path, rng, *, compression=None, buffer_snapshots=3, status="complete", attrs=None):
    """Write a run through RunWriter in uneven blocks; return the arrays it should read back as."""
    specs = _specs(max_kept=2)
    arrays = ("weight", "grad")
    w = RunWriter(
        path,
        specs,
        attrs={
            "dataset": "digits",
            "arch": "toy",
            "seed": 3,
            "config": {"model": {"lr": 0.01}},
            **(attrs or {}),
        },
        snapshot_arrays=arrays,
        buffer_snapshots=buffer_snapshots,
        buffer_steps=8,
        compression=compression,
    )
    T, every = 23, 5
    ref = {
        "steps": np.arange(T, dtype=np.int64),
        "loss": rng.normal(size=T).astype(np.float32),
        "lr": rng.uniform(size=T).astype(np.float32),
        "norm": {s.name: rng.uniform(size=(T, s.n)).astype(np.float32) for s in specs},
        "snapshot_steps": np.arange(0, T, every, dtype=np.int64),
    }
    S = len(ref["snapshot_steps"])
    ref["snap"] = {
        (s.name, a): rng.normal(size=(S, s.n_kept, s.fan_in)).astype(np.float32)
        for s in specs
        for a in arrays
    }
    blocks = [(0, 4), (4, 5), (5, 13), (13, 23)]  # uneven blocks of per-step rows
    si = 0
    for a, b in blocks:
        w.write_steps(
            ref["steps"][a:b],
            {k: v[a:b] for k, v in ref["norm"].items()},
            ref["loss"][a:b],
            ref["lr"][a:b],
        )
        while si < S and ref["snapshot_steps"][si] < b:
            w.write_snapshot(int(ref["snapshot_steps"][si]), {k: v[si] for k, v in ref["snap"].items()})
            si += 1
    w.write_val(10, 0.5, 0.8)
    w.write_val(20, 0.25, 0.9)
    w.write_event(12, "linear", 5, True, 1.5, 1.25)
    w.write_event(22, "learned", 3, False, 1.0, 2.0)
    w.write_test(acc=0.875)
    w.close(status)
    return ref


@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_round_trip_matches_in_memory_reference(tmp_path, compression):
    path = tmp_path / "run.h5"
    ref = _write_reference(path, np.random.default_rng(0), compression=compression)
    with RunFile(path) as run:
        assert run.status == "complete" and run.complete
        assert run.attrs["schema_version"] == SCHEMA_VERSION
        assert run.attrs["dataset"] == "digits" and run.attrs["seed"] == 3
        assert run.attrs["config"] == {"model": {"lr": 0.01}}
        assert run.layers == ["net.2", "net.10"]  # definition order, not HDF5's alphabetical order
        np.testing.assert_array_equal(run.steps, ref["steps"])
        np.testing.assert_array_equal(run.snapshot_steps, ref["snapshot_steps"])
        np.testing.assert_array_equal(run.metrics["train_loss"], ref["loss"])
        np.testing.assert_array_equal(run.metrics["lr"], ref["lr"])
        for name in run.layers:
            np.testing.assert_array_equal(run.norms(name), ref["norm"][name])
            np.testing.assert_array_equal(run.weights(name), ref["snap"][(name, "weight")])
            np.testing.assert_array_equal(run.array(name, "grad"), ref["snap"][(name, "grad")])
        info = run.layer_info("net.2")
        assert info["kind"] == "conv2d" and info["shape"] == (6, 1, 3, 3) and info["has_bias"]
        np.testing.assert_array_equal(info["neurons"], [1, 4])
        assert (info["n"], info["n_kept"], info["fan_in"]) == (6, 2, 10)
        assert info["arrays"] == ["grad", "weight"]
        assert run.layer_info("net.10")["fan_in"] == 7 and not run.layer_info("net.10")["has_bias"]
        np.testing.assert_array_equal(run.metrics["val/step"], [10, 20])
        np.testing.assert_allclose(run.metrics["val/acc"], [0.8, 0.9])
        assert float(run.metrics["test/acc"]) == pytest.approx(0.875)
        assert run.events() == [
            {
                "step": 12,
                "strategy": "linear",
                "horizon": 5,
                "accepted": True,
                "loss_before": 1.5,
                "loss_after": 1.25,
            },
            {
                "step": 22,
                "strategy": "learned",
                "horizon": 3,
                "accepted": False,
                "loss_before": 1.0,
                "loss_after": 2.0,
            },
        ]


def test_slicing_reads_match_numpy_indexing(tmp_path):
    path = tmp_path / "run.h5"
    ref = _write_reference(path, np.random.default_rng(1))
    norm, weight = ref["norm"]["net.10"], ref["snap"][("net.10", "weight")]
    with RunFile(path) as run:
        for sel in [
            slice(2, 9),
            slice(None, None, 3),
            slice(-4, None),
            5,
            -1,
            [7, 0, 7, 3],
            np.array([-1, 2]),
        ]:
            np.testing.assert_array_equal(run.norms("net.10", sel), norm[sel])
        for s_sel, n_sel in [
            (slice(1, 3), slice(None)),
            ([4, 0], [3, 1]),
            (-1, 2),
            (slice(None, None, -1), [0]),
        ]:
            np.testing.assert_array_equal(run.weights("net.10", s_sel, n_sel), weight[s_sel][..., n_sel, :])
        with pytest.raises(IndexError):
            run.norms("net.10", [99])


def test_existing_file_is_not_overwritten(tmp_path):
    path = tmp_path / "run.h5"
    _write_reference(path, np.random.default_rng(0))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="exists; pass overwrite=True"):
        RunWriter(path, _specs())
    assert path.read_bytes() == before
    RunWriter(path, _specs(), overwrite=True).close()
    with RunFile(path) as run:
        assert len(run.steps) == 0 and run.status == "complete"


def _one_line(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg


def test_missing_garbage_and_truncated_files_give_one_line_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist") as e:
        RunFile(tmp_path / "nope.h5")
    _one_line(e, tmp_path / "nope.h5")

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(StoreError, match="not an HDF5 file") as e:
        RunFile(garbage)
    _one_line(e, garbage)

    good = tmp_path / "good.h5"
    _write_reference(good, np.random.default_rng(0))
    data = good.read_bytes()
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{frac}.h5"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(StoreError) as e:
            with RunFile(cut) as run:  # either the open or the first read must notice
                run.weights("net.2")
                run.norms("net.10")
        _one_line(e, cut)


def test_other_schema_and_foreign_hdf5_are_refused(tmp_path):
    path = tmp_path / "run.h5"
    _write_reference(path, np.random.default_rng(0))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}") as e:
        RunFile(path)
    _one_line(e, path)

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a sleepbot run") as e:
        RunFile(foreign)
    _one_line(e, foreign)


def test_live_file_is_readable_while_written(tmp_path):
    """SWMR: a reader opened mid-run sees what was flushed, and more after refresh()."""
    path = tmp_path / "live.h5"
    spec = LayerSpec("fc", "linear", (3, 2), True, np.arange(3))
    w = RunWriter(path, [spec], buffer_snapshots=2)
    w.write_steps(np.arange(4), {"fc": np.ones((4, 3), np.float32)}, np.zeros(4), np.zeros(4))
    w.write_snapshot(0, {("fc", "weight"): np.full((3, 3), 7.0, np.float32)})
    w.flush()
    run = RunFile(path)
    assert run.status == "running" and not run.complete
    assert len(run.steps) == 4 and run.weights("fc").shape == (1, 3, 3)
    w.write_steps(np.arange(4, 6), {"fc": np.ones((2, 3), np.float32)}, np.zeros(2), np.zeros(2))
    w.write_snapshot(5, {("fc", "weight"): np.full((3, 3), 8.0, np.float32)})
    w.flush()
    run.refresh()
    np.testing.assert_array_equal(run.steps, np.arange(6))
    np.testing.assert_array_equal(run.weights("fc")[:, 0, 0], [7.0, 8.0])
    w.close()
    run.close()
    with RunFile(path) as run:
        assert run.complete


def test_chunks_stay_within_budget():
    for rows, n, f in [(64, 16, 10), (64, 32, 145), (64, 1000, 785), (64, 4, 1_000_000)]:
        c = _weight_chunks(rows, n, f)
        assert 4 * np.prod(c) <= CHUNK_BYTES and c[0] >= 1 and c[1] <= n and c[2] <= f
    assert _weight_chunks(64, 16, 10)[0] == 64  # a small layer keeps the whole buffer block in one chunk


def test_store_lists_filters_and_iterates(tmp_path):
    rng = np.random.default_rng(0)
    _write_reference(tmp_path / "a.h5", rng, attrs={"arch": "small_cnn", "lr": 0.001})
    _write_reference(tmp_path / "sub" / "b.h5", rng, attrs={"arch": "lenet5", "lr": 0.003})
    _write_reference(tmp_path / "c.h5", rng, attrs={"arch": "small_cnn", "lr": 0.003}, status="failed")
    store = TrajectoryStore(tmp_path)
    assert len(store) == 3
    assert [p.name for p in store.filter(arch="small_cnn")] == ["a.h5", "c.h5"]
    assert [p.name for p in store.filter(arch="small_cnn", status="complete")] == ["a.h5"]
    assert [p.name for p in store.filter(lr=[0.003])] == ["c.h5", "b.h5"]
    assert [p.name for p in store.filter(**{"model.lr": 0.01, "dataset": "digits"})] == [
        "a.h5",
        "c.h5",
        "b.h5",
    ]
    assert store.filter(**{"model.momentum": 0.9}) == []
    assert sorted(run.attrs["arch"] for run in store) == ["lenet5", "small_cnn", "small_cnn"]

    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(StoreError, match="broken.h5"):
        TrajectoryStore(tmp_path).filter(arch="small_cnn")
    skipping = TrajectoryStore(tmp_path, errors="skip")
    assert len(skipping.filter(arch="small_cnn")) == 2
    assert list(skipping.bad) == [tmp_path / "broken.h5"]
    with pytest.raises(StoreError, match="does not exist"):
        TrajectoryStore(tmp_path / "nowhere")


def test_plain_h5py_can_read_the_contract(tmp_path):
    """trajectories/README.md promises that plain h5py is enough."""
    path = tmp_path / "run.h5"
    ref = _write_reference(path, np.random.default_rng(2))
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        assert json.loads(f.attrs["config"]) == {"model": {"lr": 0.01}}
        assert json.loads(f.attrs["layer_order"]) == ["net.2", "net.10"]
        np.testing.assert_array_equal(f["layers/net.2/weight"][:], ref["snap"][("net.2", "weight")])
        np.testing.assert_array_equal(f["layers/net.2"].attrs["neurons"], [1, 4])
        assert f["events"][0]["strategy"] == b"linear"
