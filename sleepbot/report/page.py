"""The page's plumbing: sections that write HTML and Markdown side by side, tables, embedded figures."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sleepbot.errors import SleepbotError

SECTIONS = ("summary", "setup", "curves", "steps", "dynamics", "norms", "response", "forecast", "reproduce")
SECTION_TITLES = {
    "summary": "Headline",
    "setup": "Setup",
    "curves": "Learning curves",
    "steps": "Steps to target",
    "dynamics": "Training dynamics",
    "norms": "Neuron weight norms",
    "response": "All-ones response",
    "forecast": "Forecast against actual",
    "reproduce": "Reproduce",
}


@dataclass
class Section:
    key: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def text(self, s: str) -> None:
        self.html.append(f"<p>{html.escape(s)}</p>")
        self.md.append(s + "\n")

    def note(self, s: str) -> None:
        self.html.append(f'<p class="note">{html.escape(s)}</p>')
        self.md.append(f"_{s}_\n")


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def headline_table(workload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The headline table of one workload: (header, rows of strings); the comparison's own table renderer."""
    from sleepbot.compare import TABLE_HEADER, table_rows

    return list(TABLE_HEADER), table_rows(workload)


def add_table(sec: Section, header: list[str], rows: list[list[str]]) -> None:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    sec.html.append(f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>")
    sec.md.append("| " + " | ".join(header) + " |")
    sec.md.append("|" + "|".join("---" for _ in header) + "|")
    sec.md.extend("| " + " | ".join(r) + " |" for r in rows)
    sec.md.append("")


class Figures:
    """Renders figures once into PNG (or GIF) bytes, embeds them in the page and writes them for the Markdown."""

    def __init__(self, fig_dir: Path) -> None:
        self.dir = fig_dir
        self.failures: list[str] = []

    def add(self, sec: Section, name: str, make: Callable[[], Any], caption: str) -> bool:
        """Draw `make()` (a Figure, or a path to an image it wrote) into the section; a failure becomes a note."""
        try:
            obj = make()
        except SleepbotError as e:
            sec.note(f"{caption}: not drawn ({e})")
            self.failures.append(f"{name}: {e}")
            return False
        if isinstance(obj, (str, Path)):
            data = Path(obj).read_bytes()
            fname = Path(obj).name
            mime = "image/gif" if fname.endswith(".gif") else "image/png"
        else:
            buf = io.BytesIO()
            obj.savefig(buf, format="png", dpi=100)
            data = buf.getvalue()
            fname = f"{name}.png"
            mime = "image/png"
            (self.dir / fname).write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        sec.html.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:{mime};base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        sec.md.append(f"![{caption}]({self.dir.name}/{fname})\n")
        return True


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
.note{color:#7a5c00;background:#fff8e0;padding:.3em .6em;border-left:3px solid #e0b000}
nav a{margin-right:1em} pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
"""


def render_page(title: str, sections: list[Section], subtitle: str) -> str:
    nav = " ".join(f'<a href="#{s.key}">{SECTION_TITLES[s.key]}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.key}"><h2>{SECTION_TITLES[s.key]}</h2>\n' + "\n".join(s.html) + "\n</section>"
        for s in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p><nav>{nav}</nav>\n{body}\n'
        "</body></html>\n"
    )
