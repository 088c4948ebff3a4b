"""The documentation: the MkDocs site builds in strict mode (a broken link between pages fails it), and the
README stays a short user guide whose example config is configs/quickstart.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 14 * 1024


def test_mkdocs_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's end-of-life banner
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (site / "index.html").is_file()
    assert (site / "architecture" / "index.html").is_file()


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it a user guide of at most {README_LIMIT} (move details to docs/)"


def test_readme_config_is_the_quickstart() -> None:
    """The README's example config is configs/quickstart.yaml (what `make demo` runs), key for key."""
    readme = (ROOT / "README.md").read_text()
    _, found, rest = readme.partition("`configs/quickstart.yaml`, the demo:\n\n```yaml\n")
    assert found, "README.md lost its example config block"
    block = rest.split("\n```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
