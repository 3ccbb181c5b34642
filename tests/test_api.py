"""The public API re-exported from `sleepbot` resolves, lazily."""

import subprocess
import sys

import sleepbot


def test_every_export_resolves():
    for name in sleepbot.__all__:
        assert getattr(sleepbot, name) is not None, name


def test_import_sleepbot_is_light():
    code = "import sys, sleepbot; print('pytorch_lightning' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
