"""What a run leaves on disk: fingerprints, atomic writes and stage records.

Every file a reader may open while a run is going (summary.json, a stage record, an artifact folder) is
written beside its target and renamed into place, so a crash leaves the old version or the new one,
never half of either. A finished stage's record (`stages/<name>/stage.json`) is the cache index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

RECORD_FILE = "stage.json"  # a finished stage's record inside its stage directory


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, fsync, rename: readers see the old file or the new one, never half."""
    from clustering.files import atomic_output

    with atomic_output(path, "w") as f:
        f.write(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def replace_dir_atomic(source: Path, target: Path) -> None:
    """Copy `source` to a temp folder beside `target`, then swap it in: `target` is never half-written."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        move_dir_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_dir_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished folder onto `target`, replacing what was there (on the same filesystem)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def stage_dir(output_dir: Path, name: str) -> Path:
    path = Path(output_dir) / "stages" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / "stages" / name / RECORD_FILE


def read_record(output_dir: Path, name: str) -> dict | None:
    """A finished stage's record, or None when it is missing or unreadable (the stage then runs)."""
    try:
        record = json.loads(record_path(output_dir, name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(output_dir: Path, name: str, record: dict) -> None:
    write_json_atomic(stage_dir(output_dir, name) / RECORD_FILE, record)


def drop_record(output_dir: Path, name: str) -> None:
    """Before a stage runs again: its old record no longer describes the artifacts."""
    record_path(output_dir, name).unlink(missing_ok=True)
