"""`sleepbot report DIR`: one self-contained HTML page (figures embedded as base64, opens from disk with no
server) and a Markdown summary with the headline table, from a comparison's output directory or a directory of
recorded runs.

The page's sections, in order (each an element id, so tests and links can find them): `summary` (the headline
table), `setup` (workloads, the tuned learning rate and its grid, the target, seeds), `curves` (learning curves
per arm), `steps` (steps to target per seed), `dynamics` (asymptotes, saturation steps, layers settling),
`norms` (per-neuron weight norms), `response` (all-ones response grid and animation), `forecast` (forecast
against actual), `reproduce` (commands, config, failed runs).
"""

from __future__ import annotations

import time
from pathlib import Path

from sleepbot._version import __version__
from sleepbot.errors import SleepbotError
from sleepbot.report.page import SECTION_TITLES, SECTIONS, Figures, headline_table, render_page
from sleepbot.report.sections import compare_sections, runs_sections

__all__ = ["SECTIONS", "SECTION_TITLES", "headline_table", "write_report"]


def write_report(
    source: str | Path,
    out: str | Path | None = None,
    *,
    forecaster: str | None = None,
    title: str | None = None,
    overwrite: bool = False,
    animation: bool = True,
    command: str | None = None,
) -> tuple[Path, Path]:
    """Write `report.html` (self-contained) and `report.md` (+ `figures/`) for a comparison or a directory of runs.

    Args:
        source: a comparison's output directory (`sleepbot compare --out`), or a directory of run files.
        out: where to write (default: `source`).
        forecaster: the forecaster checkpoint for the forecast section (default: the learned arm's, if any).
        title: the page title.
        overwrite: replace an existing report.html / report.md.
        animation: embed the all-ones response animation (a GIF; MP4 written beside it when ffmpeg exists).
        command: the command that reproduces the comparison, for the `reproduce` section.

    Returns:
        (path of report.html, path of report.md).
    """
    src = Path(source)
    if not src.is_dir():
        raise SleepbotError(
            f"report source {str(src)!r} is not a directory (a compare --out dir or a dir of runs)"
        )
    dest = Path(out) if out is not None else src
    html_path, md_path = dest / "report.html", dest / "report.md"
    for p in (html_path, md_path):
        if p.exists() and not overwrite:
            raise SleepbotError(f"{str(p)!r} exists; pass --overwrite to replace it")
    fig_dir = dest / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = Figures(fig_dir)
    if (src / "results.json").is_file():
        sections, page_title = compare_sections(src, figs, forecaster, animation, command)
    else:
        sections, page_title = runs_sections(src, figs, animation)
    page_title = title or page_title
    subtitle = f"sleepbot {__version__}, written {time.strftime('%Y-%m-%d %H:%M')} from {src.resolve()}"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(render_page(page_title, sections, subtitle))
    tmp.replace(html_path)
    md = [f"# {page_title}\n", f"_{subtitle}; figures in `{fig_dir.name}/`, full page in `report.html`._\n"]
    for s in sections:
        md.append(f"## {SECTION_TITLES[s.key]}\n")
        md.extend(s.md)
    md_path.write_text("\n".join(md) + "\n")
    return html_path, md_path
