"""A small static HTML page per evaluation: metric tables, plots and cluster pages.

One self-contained file (inline CSS, no JavaScript, nothing fetched from the network) whose images are
relative links to files in the report's own folder, so the page works both from disk and from an MLflow
artifact store that keeps the folder layout.
"""

from __future__ import annotations

import html
import math
import os
from typing import Iterable, Mapping, Sequence

from .files import atomic_output

__all__ = ["format_value", "html_report"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.pages img { max-width: 48%; }
"""


def format_value(value) -> str:
    """How a metric appears in the report: integers without decimals, other floats with four."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int,)) or (isinstance(value, float) and math.isfinite(value) and value.is_integer()):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _relative(path, folder: str) -> str:
    rel = os.path.relpath(os.path.abspath(os.fspath(path)), folder)
    if rel.startswith(os.pardir):
        raise ValueError(f"html_report: {path} is outside the report folder {folder}; links would break once logged")
    return rel.replace(os.sep, "/")


def _table(rows: Iterable[Sequence], header: Sequence[str]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{html.escape(format_value(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_report(
    path,
    *,
    title: str,
    metrics: Mapping[str, float],
    figures: Sequence[tuple[str, str]] = (),
    pages: Sequence[tuple[str, str]] = (),
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence]]] | None = None,
    links: Sequence[tuple[str, str]] = (),
) -> str:
    """Write the report and return ``path`` (as str).

    Args:
        metrics: name -> value, one table row each.
        figures: (caption, image path) shown full width, e.g. t-SNE, the cluster overview grid.
        pages: (caption, image path) of the per-cluster pages, shown two per row.
        tables: heading -> (header, rows) for extra tables (e.g. silhouette per k).
        links: (label, file path) to other artifacts (CSV, JSON) next to the report.
    Every file must lie in the report's folder or below it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        "<h2>Metrics</h2>",
        _table(sorted(metrics.items()), ("metric", "value")),
    ]
    for heading, (header, rows) in (tables or {}).items():
        parts += [f"<h2>{esc(heading)}</h2>", _table(rows, header)]
    if links:
        parts.append("<h2>Files</h2><ul>")
        parts += [f'<li><a href="{esc(_relative(p, folder))}">{esc(label)}</a></li>' for label, p in links]
        parts.append("</ul>")
    if figures:
        parts.append("<h2>Plots</h2>")
        for caption, p in figures:
            src = esc(_relative(p, folder))
            parts.append(f'<figure><img src="{src}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>')
    if pages:
        parts.append('<h2>Clusters</h2><div class="pages">')
        for caption, p in pages:
            src = esc(_relative(p, folder))
            parts.append(f'<a href="{src}"><img src="{src}" alt="{esc(caption)}" title="{esc(caption)}"></a>')
        parts.append("</div>")
    parts.append("</body></html>")
    text = "\n".join(parts) + "\n"
    with atomic_output(path) as f:
        f.write(text)
    return path
