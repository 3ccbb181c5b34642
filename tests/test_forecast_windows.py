"""The windows dataset against a slow reference loop, and the split by run."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sleepbot.errors import SleepbotError
from sleepbot.forecast.synthetic import write_synthetic_runs
from sleepbot.forecast.windows import (
    WindowDataset,
    collate_groups,
    resolve_paths,
    scan_runs,
    split_runs,
)

CONTEXT, HORIZONS = 3, (2, 5)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these tiny models gain nothing from two, and the suite shares 2 cores with other
    processes, where two spinning OpenMP threads per process slow everything down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three runs of different layer shapes and lengths (random values: any mix-up shows)."""
    root = tmp_path_factory.mktemp("windows_store")
    write_synthetic_runs(
        root, runs=2, snapshots=12, noise=1.0, layers=(("a", "conv2d", 5, 4), ("b", "linear", 3, 7))
    )
    write_synthetic_runs(
        root, runs=1, snapshots=9, noise=1.0, layers=(("c", "linear", 40, 2),), arch="wide", seed=7
    )
    return root


def reference_windows(runs):
    """{(run, layer, neuron, t_end): (history [C, F], {h: target [F]})}, by plain loops over whole arrays."""
    from sleepbot.store import RunFile

    out = {}
    for ri, info in enumerate(runs):
        with RunFile(info.path) as f:
            for layer in f.layers:
                w = f.weights(layer)  # [S, N, F]
                s = len(w)
                for n in range(w.shape[1]):
                    for t in range(CONTEXT - 1, s - HORIZONS[0]):
                        hist = np.stack([w[t - CONTEXT + 1 + k, n] for k in range(CONTEXT)])
                        targets = {h: w[t + h, n] for h in HORIZONS if t + h < s}
                        out[(ri, layer, n, t)] = (hist, targets)
    return out


def windows_of(group):
    """Unpack a group into the reference's keys: position-major, neurons within each position."""
    hist, target, mask = group["history"], group["target"], group["mask"]
    nn = group["neurons"]
    for b, t in enumerate(group["t_end"].tolist()):
        for j in range(nn):
            m = b * nn + j
            targets = {h: target[k, m].numpy() for k, h in enumerate(HORIZONS) if mask[k, m]}
            yield (group["run"], group["layer"], group["neuron0"] + j, t), (hist[:, m].numpy(), targets)


def check_against_reference(groups, ref):
    seen = Counter()
    for group in groups:
        assert group["history"].shape[0] == CONTEXT
        for key, (hist, targets) in windows_of(group):
            assert key in ref, key
            ref_hist, ref_targets = ref[key]
            np.testing.assert_array_equal(hist, ref_hist)
            assert targets.keys() == ref_targets.keys(), key
            for h in targets:
                np.testing.assert_array_equal(targets[h], ref_targets[h])
            seen[key] += 1
    return seen


def test_all_mode_matches_the_reference_loop(store):
    runs = scan_runs(resolve_paths(store))
    ref = reference_windows(runs)
    ds = WindowDataset(runs, CONTEXT, HORIZONS, mode="all", max_weights=24, positions=2)
    seen = check_against_reference(ds, ref)
    assert set(seen) == set(ref) and set(seen.values()) == {1}  # every window exactly once
    # Progress is the step of the last context snapshot over max_steps.
    group = next(iter(ds))
    steps = runs[group["run"]].snapshot_steps[group["t_end"].numpy()]
    expected = np.repeat(steps / runs[group["run"]].max_steps, group["neurons"])
    np.testing.assert_allclose(group["progress"].numpy(), expected, rtol=1e-6)


def test_workers_shard_without_loss_or_duplicates(store):
    runs = scan_runs(resolve_paths(store))
    ref = reference_windows(runs)
    ds = WindowDataset(runs, CONTEXT, HORIZONS, mode="all", max_weights=24, positions=2)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_groups, num_workers=2)
    seen = check_against_reference((g for batch in loader for g in batch), ref)
    assert set(seen) == set(ref) and set(seen.values()) == {1}


def test_random_mode_windows_are_real_and_balanced(store):
    runs = scan_runs(resolve_paths(store))
    ref = reference_windows(runs)
    ds = WindowDataset(
        runs, CONTEXT, HORIZONS, mode="random", groups=600, max_weights=24, positions=2, seed=3
    )
    groups = list(ds)
    assert len(groups) == 600
    check_against_reference(groups, ref)
    # Balanced over runs however many neurons they hold (the `wide` run has 40 neurons in its one layer, the
    # others 8 in two), and over the layers within a run.
    per_run = Counter(g["run"] for g in groups)
    assert min(per_run.values()) > 600 / 3 * 0.8, per_run
    per_layer = Counter((g["run"], g["layer"]) for g in groups if runs[g["run"]].group[1] != "wide")
    assert min(per_layer.values()) > 400 / 4 * 0.7, per_layer
    # Reproducible per (seed, epoch); another epoch draws other windows.
    again = list(
        WindowDataset(runs, CONTEXT, HORIZONS, mode="random", groups=600, max_weights=24, positions=2, seed=3)
    )
    assert all(torch.equal(a["history"], b["history"]) for a, b in zip(groups, again))
    ds.set_epoch(1)
    other = list(ds)
    assert not all(torch.equal(a["t_end"], b["t_end"]) for a, b in zip(groups, other))


def test_progress_dropout_hides_progress(store):
    runs = scan_runs(resolve_paths(store))
    ds = WindowDataset(runs, CONTEXT, HORIZONS, groups=200, progress_dropout=0.5, max_weights=24, seed=0)
    hidden = torch.cat([torch.isnan(g["progress"]) for g in ds]).float()
    assert 0.35 < hidden.mean().item() < 0.65


def test_split_is_by_run_and_never_leaks(store, tmp_path):
    write_synthetic_runs(tmp_path, runs=7, snapshots=8, arch="x")
    write_synthetic_runs(tmp_path, runs=3, snapshots=8, arch="y", seed=20)
    runs = scan_runs(resolve_paths(tmp_path))
    ids = {r.run_id for r in runs}
    split = split_runs(runs, (0.15, 0.15), seed=0)
    sets = [set(split[s]) for s in ("train", "val", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == ids
    # Every group of 3+ runs gives val and test one run at least.
    for arch in ("x", "y"):
        for s in ("val", "test"):
            assert any(i.startswith(f"{arch}-") for i in split[s]), (arch, s)
    assert split == split_runs(list(reversed(runs)), (0.15, 0.15), seed=0)  # order-independent
    assert split != split_runs(runs, (0.15, 0.15), seed=1)
    held = split_runs(runs, seed=0, holdout={"arch": "y"})
    assert {i for i in ids if i.startswith("y-")} <= set(held["test"])
    assert not any(i.startswith("y-") for i in held["train"] + held["val"])
    # The training dataset built from the split reads only training runs.
    train = [r for r in runs if r.run_id in held["train"]]
    ds = WindowDataset(train, CONTEXT, HORIZONS, groups=50, max_weights=64)
    assert {train[g["run"]].run_id for g in ds} <= set(held["train"])


def test_bad_inputs(store, tmp_path):
    runs = scan_runs(resolve_paths(store))
    with pytest.raises(SleepbotError, match="snapshots a window needs"):
        WindowDataset(runs, 20, (5,))
    with pytest.raises(SleepbotError, match="unknown window mode"):
        WindowDataset(runs, CONTEXT, HORIZONS, mode="sometimes")
    with pytest.raises(SleepbotError, match="does not exist"):
        resolve_paths(tmp_path / "nowhere")
    with pytest.raises(SleepbotError, match="no run files"):
        resolve_paths(tmp_path)
    write_synthetic_runs(tmp_path / "mixed", runs=1, snapshots=6, every=10)
    write_synthetic_runs(tmp_path / "mixed", runs=1, snapshots=6, every=5, seed=9)
    with pytest.raises(SleepbotError, match="snapshots every"):
        scan_runs(resolve_paths(tmp_path / "mixed"))


def test_smoothed_targets_are_the_mean_of_the_last_snapshots(store):
    runs = scan_runs(resolve_paths(store))
    ref = reference_windows(runs)
    from sleepbot.store import RunFile

    weights = {}
    for ri, info in enumerate(runs):
        with RunFile(info.path) as f:
            for layer in f.layers:
                weights[(ri, layer)] = f.weights(layer)
    ds = WindowDataset(runs, CONTEXT, HORIZONS, mode="all", max_weights=24, positions=2, smooth=2)
    checked = 0
    for group in ds:
        for (ri, layer, n, t), (hist, targets) in windows_of(group):
            np.testing.assert_array_equal(hist, ref[(ri, layer, n, t)][0])  # the context is not smoothed
            assert targets.keys() == ref[(ri, layer, n, t)][1].keys()
            w = weights[(ri, layer)]
            for h, got in targets.items():
                np.testing.assert_allclose(got, (w[t + h, n] + w[t + h - 1, n]) / 2, rtol=1e-6, atol=1e-7)
                checked += 1
    assert checked > 100
    with pytest.raises(SleepbotError, match="smoothing"):
        WindowDataset(runs, CONTEXT, HORIZONS, smooth=HORIZONS[0] + 1)


def test_min_context_draws_every_history_length_from_the_first_allowed_end(store):
    runs = scan_runs(resolve_paths(store))
    ref = reference_windows(runs)
    ds = WindowDataset(
        runs, 6, HORIZONS, mode="random", groups=300, max_weights=24, positions=2, seed=1, min_context=2
    )
    groups = list(ds)
    lengths = Counter(g["history"].shape[0] for g in groups)
    assert sorted(lengths) == [2, 3, 4, 5, 6] and min(lengths.values()) > 300 / 5 * 0.6, lengths
    for g in groups:  # every window is the run's real snapshots: its last rows match the 3-snapshot reference
        c = g["history"].shape[0]
        assert int(g["t_end"].min()) >= c - 1
        if c >= CONTEXT:
            sub = dict(g, history=g["history"][-CONTEXT:])
            check_against_reference([sub], ref)
    with pytest.raises(SleepbotError, match="min_context"):
        WindowDataset(runs, 3, HORIZONS, min_context=4)
