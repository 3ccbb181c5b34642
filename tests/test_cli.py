"""The CLI as a user meets it: help, one-line errors with exit code 2, no traceback, no heavy imports."""

import subprocess
import sys

import pytest

from sleepbot.cli import main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sleepbot.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from sleepbot.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'pytorch_lightning', 'h5py', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model.arch", "alexnet"],
        ["train", "--model.optimizer", "lion"],
        ["sleep", "--strategy", "dream"],
        ["sleep", "--sleep.horizon", "far"],
        ["compare", "--config", "configs/compare_quick.yaml", "--out", "/nonexistent/x", "--seeds", "0"],
    ],
)
def test_bad_arguments_are_answered_without_importing_torch(argv):
    code = (
        "import sys; from sleepbot.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "2 []", proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_lists_commands():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "train" in proc.stdout and "demo" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model.arch", "alexnet"], "unknown model.arch 'alexnet'"),
        (["train", "--data.name", "imagenet"], "unknown data.name 'imagenet'"),
        (["train", "--model.optimizer", "lion"], "unknown model.optimizer 'lion'"),
        (["train", "--trainer.bogus", "1"], "unknown config key 'trainer.bogus'"),
        (["train", "--trainer.max_steps", "lots"], "must be int"),
        (["train", "--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_input_in_a_subprocess_has_no_traceback():
    proc = _run("train", "--model.arch", "alexnet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("sleepbot: error: unknown model.arch 'alexnet'; valid:")
    assert "Traceback" not in proc.stderr


def test_print_config(capsys):
    assert main(["train", "--print-config", "--model.arch", "lenet5", "--trainer.max_steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "arch: lenet5" in out and "max_steps: 5" in out


def test_train_command_runs(tmp_path, capsys):
    args = ["train", "--trainer.max_steps", "20", "--data.train_subset", "128", "--out_dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "20 steps" in out and "test acc" in out
    assert (tmp_path / "digits-small_cnn-adam-s0" / "metrics.csv").is_file()
