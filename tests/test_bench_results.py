"""bench/results.write_section: the one writer of bench/RESULTS.md sections (no Ray, no training)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.results import NOTES_CLOSE, NOTES_OPEN, RESULTS, notes_block, split_sections, write_section

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = f"""# Benchmark results

## Alpha (bench/alpha.py)

Old alpha text.

| a | b |
|---|---|
| 1 | 2 |

{NOTES_OPEN}

- A hand-written note on alpha.
- Its second line, with a heading-like line below that is not a section:
## not a heading inside notes

{NOTES_CLOSE}

## Beta (bench/beta.py)

Beta text, generated.

## Notes moved from the README

Hand-written, never touched.
"""


def sections(text: str) -> dict[str, str]:
    return {chunk.splitlines()[0]: chunk for chunk in split_sections(text)[1:]}


def test_split_sections_round_trips():
    chunks = split_sections(SAMPLE)
    assert "".join(chunks) == SAMPLE
    assert [c.splitlines()[0] for c in chunks[1:]] == [
        "## Alpha (bench/alpha.py)", "## Beta (bench/beta.py)", "## Notes moved from the README"]


def test_rewrite_keeps_notes_and_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(SAMPLE)
    before = sections(SAMPLE)
    write_section("## Alpha (bench/alpha.py)", "New alpha text.\n\n| a | b |\n|---|---|\n| 3 | 4 |\n", path)
    after_text = path.read_text()
    after = sections(after_text)
    assert list(after) == list(before)  # same sections, same order
    for heading in ("## Beta (bench/beta.py)", "## Notes moved from the README"):
        assert after[heading] == before[heading]  # byte-identical
    assert after_text.startswith(split_sections(SAMPLE)[0])
    alpha = after["## Alpha (bench/alpha.py)"]
    assert "New alpha text." in alpha and "Old alpha text." not in alpha and "| 3 | 4 |" in alpha
    assert notes_block(alpha) == notes_block(before["## Alpha (bench/alpha.py)"])
    assert alpha.index("| 3 | 4 |") < alpha.index(NOTES_OPEN)  # notes follow the generated text

    # a second rerun changes nothing when the generated text is the same
    write_section("Alpha (bench/alpha.py)", "New alpha text.\n\n| a | b |\n|---|---|\n| 3 | 4 |\n", path)
    assert path.read_text() == after_text


def test_section_without_notes_and_new_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(SAMPLE)
    before = sections(SAMPLE)
    write_section("## Beta (bench/beta.py)", "Beta, rerun.", path)
    mid = path.read_text()
    assert sections(mid)["## Beta (bench/beta.py)"] == "## Beta (bench/beta.py)\n\nBeta, rerun.\n\n"
    assert sections(mid)["## Alpha (bench/alpha.py)"] == before["## Alpha (bench/alpha.py)"]

    write_section("## Gamma (bench/gamma.py)", "Gamma text.\n", path)
    text = path.read_text()
    assert text.startswith(mid.rstrip("\n"))  # everything before it untouched
    assert text.endswith("\n\n## Gamma (bench/gamma.py)\n\nGamma text.\n")
    assert list(sections(text))[-1] == "## Gamma (bench/gamma.py)"


def test_headings_match_exactly(tmp_path):
    """A heading that is a prefix of another (the STML seed sections) picks its own section only."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## STML (bench/stml.py)\n\nseed 0\n\n## STML, seed 1 (bench/stml.py)\n\nseed 1\n")
    write_section("## STML, seed 1 (bench/stml.py)", "seed 1 again", path)
    text = path.read_text()
    assert "seed 0\n" in text and "seed 1 again\n" in text and "\nseed 1\n" not in text


def test_missing_file_and_bad_bodies(tmp_path):
    path = tmp_path / "sub" / "RESULTS.md"
    write_section("## Only", "text", path)
    assert path.read_text() == "# Benchmark results\n\n## Only\n\ntext\n"
    with pytest.raises(ValueError):
        write_section("## Only", f"{NOTES_OPEN}\nsmuggled\n{NOTES_CLOSE}", path)
    path.write_text(f"# Benchmark results\n\n## Only\n\ntext\n\n{NOTES_OPEN}\nunclosed\n")
    with pytest.raises(ValueError):
        write_section("## Only", "text", path)


def test_committed_results_file_is_well_formed():
    """Every notes block in bench/RESULTS.md is closed, no heading is doubled, and every bench script's
    section writes go through bench/results.py (no second copy of the section-writing code)."""
    text = RESULTS.read_text()
    assert text.count(NOTES_OPEN) == text.count(NOTES_CLOSE)
    headings = [chunk.splitlines()[0] for chunk in split_sections(text)[1:]]
    assert len(headings) == len(set(headings))
    for chunk in split_sections(text)[1:]:
        notes_block(chunk)  # raises on an unclosed block
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.name == "results.py":
            continue
        source = script.read_text()
        assert not re.search(r"def write_section", source), script.name


def test_scaling_verdicts_from_rows():
    """bench/scaling.py's pass lines come from the numbers: flat stream memory, stream >= 0.9x memory images/s,
    a cached stream rerun within 60 s with every stage reused (no Ray, no run)."""
    from bench.scaling import verdicts

    def row(backend, n, mem, ips, rerun):
        return {"backend": backend, "n": n, "driver_hwm_mb": mem, "driver_anon_mb": mem, "worker_rss_mb": mem,
                "worker_anon_mb": mem, "images_per_sec": ips, "rerun_s": rerun, "rerun_all_reused": True}

    rows = [row("memory", 10, 100, 50, 5), row("memory", 30, 200, 50, 9), row("memory", 100, 900, 50, 70),
            row("stream", 10, 100, 46, 5), row("stream", 30, 104, 46, 6), row("stream", 100, 109, 46, 59)]
    lines = verdicts(rows, throughput_n=30, rerun_n=100)
    assert len(lines) == 6 and all("**pass**" in line for line in lines), lines
    rows[-1].update(worker_anon_mb=111, rerun_s=61)
    rows[-2].update(images_per_sec=44)
    lines = verdicts(rows, throughput_n=30, rerun_n=100)
    assert [("FAIL" in line) for line in lines] == [False, False, False, True, True, True], lines
    assert "not computed" in verdicts([r for r in rows if r["backend"] == "stream"], 30, 100)[0]
    assert "not measured" in verdicts(rows, throughput_n=20, rerun_n=100)[-2]
