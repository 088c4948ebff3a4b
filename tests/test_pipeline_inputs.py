"""Pipeline-level handling of bad inputs: skipped files are counted in MLflow, bad sources exit with 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cats" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "dogs" / "empty.png").write_bytes(b"")


def test_skipped_files_are_counted_in_mlflow_and_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    make_folder(tmp_path / "imgs")
    cfg = validate_config({
        "name": "folder",
        "data": {"source": "folder", "root": str(tmp_path / "imgs"), "load_size": 16},
        "stages": [{"name": "pixels", "kind": "evaluate", "input": "pixels", "tsne": False, "clusters": 2, "knn_k": 3}],
    })
    logs: list[str] = []
    summary = PipelineRun(cfg, tmp_path / "out", log=logs.append).run()
    assert any("broken.jpg" in line for line in logs) and any("empty.png" in line for line in logs)
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    # train and eval splits are the same folder here: each bad file is met once per split
    assert parent.data.metrics["data_skipped_files"] == 4
    assert parent.data.metrics["data_train_images"] == 12
    skipped = client.download_artifacts(parent.info.run_id, "skipped_files.tsv", str(tmp_path))
    assert "broken.jpg" in Path(skipped).read_text()
    rows = Path(summary["stages"]["pixels"]["artifacts"]["assignments"]).read_text().splitlines()
    assert len(rows) == 13 and "cats" in rows[1]


def test_missing_and_empty_sources_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        config = tmp_path / "c.yaml"
        config.write_text(textwrap.dedent(f"""
            name: bad
            data: {{source: folder, root: {root}}}
            stages: [{{name: pixels, kind: evaluate, input: pixels}}]
        """))
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output-dir",
                               str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert str(root) in proc.stderr and "Traceback" not in proc.stderr


def test_colorization_on_grayscale_data_exits_2_before_anything_starts(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""
        name: gray
        data: {source: digits}
        stages: [{name: colorize, kind: pretext, method: colorization, epochs: 1}]
    """))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "stages[colorize]: method 'colorization' needs colour images" in proc.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.parametrize("stage,message", [
    ("{name: probe, kind: finetune, epochs: 1}", "stage 'probe': fine-tuning needs labels, but the training split"),
    ("{name: metric, kind: metric, epochs: 1}", "stage 'metric': metric learning needs labels"),
])
def test_a_labeled_stage_on_unlabeled_data_exits_2_before_anything_starts(tmp_path, stage, message):
    """The photos source has no labels: a finetune or metric stage after an hour of pretext training would
    fail then; it is refused before any stage runs or anything is written to MLflow."""
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(f"""
        name: unlabeled
        data: {{source: photos, load_size: 32}}
        stages:
          - {{name: simclr, kind: pretext, method: simclr, epochs: 1}}
          - {stage}
    """))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out" / "mlflow.db").exists()
