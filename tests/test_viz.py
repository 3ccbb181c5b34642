"""Each plot function writes a non-empty image from tiny real runs, from every kind of source it accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _compare_fixture import tiny_comparison

from sleepbot.errors import SleepbotError
from sleepbot.viz import (
    animate_response,
    compute_responses,
    plot_learning_curves,
    plot_norms,
    plot_response_grid,
    plot_steps_to_target,
)
from sleepbot.viz.response import has_ffmpeg, tile

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def comparison(tmp_path_factory):
    return tiny_comparison(tmp_path_factory)


@pytest.fixture(scope="session")
def run_file(comparison):
    return sorted((comparison / "runs").glob("*__none__*.h5"))[0]


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    return data


def test_learning_curves_from_every_source(comparison, run_file, tmp_path):
    result_files = sorted((comparison / "runs").glob("*.json"))
    results = [json.loads(p.read_text()) for p in result_files]
    sources = {
        "compare_dir": comparison,
        "runs_dir": comparison / "runs",
        "run_file": run_file,
        "result_dicts": results,
        "mapping": {"a": results[:2], "b": results[2:]},
        "one_json": result_files[0],
    }
    for name, src in sources.items():
        fig = plot_learning_curves(src, tmp_path / f"{name}.png")
        _png(tmp_path / f"{name}.png")
        assert fig.axes
    fig = plot_learning_curves(comparison, zoom=False)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[:5] == [
        "none (n=2)",
        "momentum (n=2)",
        "linear (n=2)",
        "oracle (n=2)",
        "linear+momentum (n=2)",
    ]


def test_learning_curves_of_live_run_results(comparison, tmp_path):
    from sleepbot.training import RunResult

    keep = set(RunResult.__dataclass_fields__)
    data = json.loads(sorted((comparison / "runs").glob("*__linear__*.json"))[0].read_text())
    result = RunResult(
        **{k: v for k, v in data.items() if k in keep}
    )  # a RunResult object, as run_training returns
    fig = plot_learning_curves([result], tmp_path / "live.png", metric="val_loss")
    _png(tmp_path / "live.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["linear (n=1)"]
    with pytest.raises(SleepbotError, match="unknown curve metric"):
        plot_learning_curves([result], metric="train_acc")


def test_steps_to_target_plot(comparison, tmp_path):
    plot_steps_to_target(comparison, tmp_path / "steps.png")
    _png(tmp_path / "steps.png")


def test_norms_from_file_dir_and_open_run(comparison, run_file, tmp_path):
    from sleepbot.store import RunFile

    plot_norms(run_file, tmp_path / "a.png")
    plot_norms(comparison, tmp_path / "b.png", run="__linear__", layers=["net.1"])
    with RunFile(run_file) as f:  # an open (possibly live) RunFile stays open afterwards
        fig = plot_norms(f, tmp_path / "c.png")
        assert len(f.steps) > 0
    assert len([ax for ax in fig.axes if ax.get_title()]) == 3  # one column per layer
    for name in "abc":
        _png(tmp_path / f"{name}.png")
    with pytest.raises(SleepbotError, match="has 'nope' in its name|no run file"):
        plot_norms(comparison, run="nope")


def test_tile_layouts_by_hand():
    conv = np.arange(16.0).reshape(4, 2, 2)
    img = tile(conv)  # 2 x 2 maps of 2 x 2 with a NaN gutter: 5 x 5
    assert img.shape == (5, 5) and np.isnan(img[2]).all() and img[0, 0] == 0 and img[3, 3] == 12
    assert tile(np.ones((3, 7))).shape == (3, 7)
    lin = tile(np.arange(10.0))
    assert lin.shape == (3, 4) and np.isnan(lin[-1, -2:]).all()


def test_response_matches_the_first_layer_by_hand(run_file):
    from sleepbot.store import RunFile

    resp = compute_responses(run_file, snapshots=[0, 2])
    with RunFile(run_file) as f:
        w = f.weights("net.0.0", snapshots=[0, 2])  # [2, 16, 9 + 1 bias]
    # For an all-ones input, the centre pixel of a 3x3 conv's output is the sum of its kernel plus its bias.
    centre = resp.layers["net.0.0"][:, :, 4, 4]  # [2, 16]
    np.testing.assert_allclose(centre, w.sum(axis=2), rtol=1e-5, atol=1e-6)
    assert resp.layers["net.1"].shape == (2, 10)


def test_response_grid_and_animation(run_file, tmp_path):
    plot_response_grid(run_file, tmp_path / "grid.png", snapshots=3)
    _png(tmp_path / "grid.png")
    gif = animate_response(run_file, tmp_path / "resp.gif", fps=4)
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 5  # snapshots at steps 0, 10, 20, 30, 40
    if has_ffmpeg():
        mp4 = animate_response(run_file, tmp_path / "resp.mp4")
        assert mp4.stat().st_size > 1000
    else:
        with pytest.raises(SleepbotError, match="needs ffmpeg"):
            animate_response(run_file, tmp_path / "resp.mp4")
    with pytest.raises(SleepbotError, match="unknown animation format"):
        animate_response(run_file, tmp_path / "resp.avi")


def test_response_of_a_live_module(tmp_path):
    from sleepbot.models import Classifier

    model = Classifier(arch="small_cnn", input_shape=(1, 8, 8), num_classes=10)
    resp = compute_responses(model, input_shape=(1, 8, 8))
    assert resp.layers["net.0.2"].shape == (1, 32, 8, 8)
    plot_response_grid(model, tmp_path / "live.png", responses=resp)
    _png(tmp_path / "live.png")
