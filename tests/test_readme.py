"""The README's code block runs as written (in a temporary directory)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_runs(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its example block"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the progress bar shares stdout: keep the example's own printed lines
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("complete ", "{'step'"))]
    assert lines[0].startswith("complete ['net.0.0', 'net.0.2', 'net.1'] (21, 16, 10)")
    events = [eval(line, {"nan": float("nan")}) for line in lines[1:]]  # noqa: S307 - our own printed dicts
    assert [e["step"] for e in events] == [50, 100, 150]
    assert all(e["strategy"] == "learned" for e in events)
    assert (tmp_path / "run.h5").is_file()


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make (\w+)", quick, re.M)
    assert commands == ["demo", "test"]
    assert "make test" in (Path(__file__).parents[1] / ".ci" / "run").read_text()
