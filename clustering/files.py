"""Atomic file output: readers (artifact loggers, a concurrent job) never see a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator

__all__ = ["atomic_output"]


@contextmanager
def atomic_output(path, mode: str = "w", *, encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on a clean exit flush, fsync, chmod 0644 and rename it
    onto ``path``; on any error (or interrupt) remove it and leave ``path`` as it was.

    ``mode`` is ``"w"`` (text, ``encoding``/``newline`` as for :func:`open`) or ``"wb"`` (binary; the file
    object can be handed to ``PIL.Image.save`` or ``Figure.savefig`` with an explicit ``format``). The
    target's folder is created if missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output: mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        try:
            f = os.fdopen(fd, mode, **text)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; artifacts are meant to be shared and read by others.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
