"""The report: one self-contained HTML page with every section, and a Markdown summary with the headline table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _compare_fixture import tiny_comparison

from sleepbot.errors import SleepbotError
from sleepbot.report import SECTIONS, write_report


@pytest.fixture(scope="session")
def comparison(tmp_path_factory):
    return tiny_comparison(tmp_path_factory)


@pytest.fixture(scope="session")
def report(comparison, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(comparison, out)


def test_page_has_every_section_and_embeds_its_figures(report):
    html_path, _ = report
    page = html_path.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page, key
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 5
    assert all(src.startswith(("data:image/png;base64,", "data:image/gif;base64,")) for src in images)
    assert "data:image/gif;base64," in page  # the all-ones response animation
    # Self-contained: nothing is fetched from a server or another file.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<table>" in page and "steps to target, median [95% CI]" in page


def test_markdown_summary_has_the_headline_table(report):
    html_path, md_path = report
    md = md_path.read_text()
    assert "| arm | base optimizer (lr) | n | steps to target, median [95% CI] |" in md
    for arm in ("none", "linear", "oracle"):
        assert re.search(rf"^\| {arm} \| 2 \|", md, re.M), arm
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (md_path.parent / fig).is_file(), fig
    assert "lr" in md and "(chosen)" in md  # the tuned lr and its grid are stated
    assert re.search(
        r"^\| oracle \| linear \| 2 \| [0-9.]+x \[", md, re.M
    )  # the config's pair, under the table


def test_no_overwrite_without_permission(comparison, report):
    html_path, _ = report
    with pytest.raises(SleepbotError, match="--overwrite"):
        write_report(comparison, html_path.parent)
    before = html_path.stat().st_size
    assert before > 0


def test_report_of_a_plain_directory_of_runs(comparison, tmp_path):
    html_path, md_path = write_report(comparison / "runs", tmp_path, animation=False)
    page = html_path.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    assert "recorded run(s)" in md_path.read_text()


def test_report_errors(tmp_path):
    with pytest.raises(SleepbotError, match="not a directory"):
        write_report(tmp_path / "missing")
    with pytest.raises(SleepbotError, match="no run files"):
        write_report(tmp_path)


def test_cli_report(comparison, tmp_path, capsys):
    from sleepbot.cli import main

    assert main(["report", str(comparison), "--out", str(tmp_path), "--no-animation"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(comparison), "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_readme_results_script_at_toy_size(comparison, tmp_path):
    """scripts/readme_results.py on the tiny comparison: resumable, so it only re-summarises (no training)."""
    import runpy
    import shutil

    import yaml
    from _compare_fixture import TINY

    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    script = runpy.run_path(str(Path(__file__).parent.parent / "scripts" / "readme_results.py"))
    table, figure = tmp_path / "t.md", tmp_path / "f.png"
    assert (
        script["main"](
            ["--config", str(cfg), "--out", str(out), "--table", str(table), "--figure", str(figure)]
        )
        == 0
    )
    text = table.read_text()
    assert "| arm | base optimizer (lr) | n |" in text and "from 0.003, 0.01 (best final val acc)" in text
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert json.loads(table.with_suffix(".json").read_text())["headline"][0]["arm"] == "none"
    # Without --config it only reads results.json (what the README does with `make demo`'s output).
    table2 = tmp_path / "t2.md"
    assert script["main"](["--out", str(out), "--table", str(table2), "--figure", str(figure)]) == 0
    assert table2.read_text().split("_Produced")[0] == text.split("_Produced")[0]
