"""The one writer of bench/RESULTS.md: each bench script rewrites its own `## ` section and nothing else.

A section is its heading line and everything up to the next `## ` heading. A script owns the section
whose heading line it writes (matched exactly, so "## STML on unseen classes (bench/stml.py)" and
"## STML on unseen classes, seed 1 (bench/stml.py)" are two sections). Rewriting a section:

- replaces its generated text with the script's new text, in place (the section keeps its position);
- keeps the section's hand-written notes block, the lines from ``<!-- notes -->`` to ``<!-- /notes -->``,
  byte for byte, after the new text: prose that no script produces lives there and survives reruns;
- leaves every other section byte-identical, including sections no script writes (such as
  "## Notes moved from the README" and "## Quickstart demo");
- appends a section that is not there yet at the end of the file.

Every script takes ``--results PATH`` (see :func:`add_results_argument`) so that a smoke run can write a
scratch copy instead of the committed file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
NOTES_OPEN = "<!-- notes -->"
NOTES_CLOSE = "<!-- /notes -->"
PREAMBLE = "# Benchmark results\n"

__all__ = ["RESULTS", "NOTES_OPEN", "NOTES_CLOSE", "add_results_argument", "split_sections", "notes_block",
           "write_section"]


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """``--results PATH``: the file whose section the script rewrites (default: the committed bench/RESULTS.md)."""
    parser.add_argument("--results", type=Path, default=RESULTS, metavar="PATH",
                        help="results file to write this script's section into (default: bench/RESULTS.md; "
                             "give a scratch copy for smoke runs)")


def _heading(title: str) -> str:
    title = title.strip()
    return title if title.startswith("## ") else "## " + title


def split_sections(text: str) -> list[str]:
    """``text`` cut before each `## ` heading line: [preamble, section, section, ...]; ``"".join`` gives it back.

    Heading-like lines inside a notes block or a fenced code block do not start a section.
    """
    chunks, current, in_notes, in_fence = [], [], False, False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        elif stripped == NOTES_OPEN:
            in_notes = True
        elif stripped == NOTES_CLOSE:
            in_notes = False
        elif line.startswith("## ") and not in_notes and not in_fence:
            chunks.append("".join(current))
            current = []
        current.append(line)
    chunks.append("".join(current))
    return chunks


def notes_block(section: str) -> str | None:
    """The hand-written block of a section, markers included, exactly as it stands; None without one."""
    lines = section.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == NOTES_OPEN]
    if not starts:
        return None
    ends = [i for i, line in enumerate(lines) if line.strip() == NOTES_CLOSE and i > starts[0]]
    if not ends:
        raise ValueError(f"{NOTES_OPEN} without {NOTES_CLOSE} in section {lines[0].strip()!r}")
    return "".join(lines[starts[0]:ends[-1] + 1]).rstrip("\n")


def write_section(title: str, body: str, path: Path | str = RESULTS) -> None:
    """Rewrite the section headed ``title`` (with or without its leading "## ") of ``path`` to hold ``body``.

    The old section's notes block is kept after ``body``; every other byte of the file stays as it was. A
    section not yet in the file is appended; a missing file is created with a "# Benchmark results" title.
    """
    path = Path(path)
    heading = _heading(title)
    if NOTES_OPEN in body or NOTES_CLOSE in body:
        raise ValueError("a script's generated text must not carry notes markers; notes are written by hand")
    old = path.read_text() if path.exists() else PREAMBLE
    chunks = split_sections(old)
    matches = [i for i, chunk in enumerate(chunks) if i > 0 and chunk.splitlines()[0].rstrip() == heading]
    if len(matches) > 1:
        raise ValueError(f"{path}: {len(matches)} sections headed {heading!r}")
    new = heading + "\n\n" + body.strip("\n") + "\n"
    if matches:
        i = matches[0]
        notes = notes_block(chunks[i])
        if notes is not None:
            new += "\n" + notes + "\n"
        old_chunk = chunks[i]
        trailing = old_chunk[len(old_chunk.rstrip("\n")):]  # the blank lines before the next section
        chunks[i] = new.rstrip("\n") + (trailing or "\n")
        text = "".join(chunks)
    else:
        text = old.rstrip("\n") + "\n\n" + new
    _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
