"""Stage inputs that are not stages of the pipeline: an artifact folder, `pretrained` (the configured backbone with
its weights) and a `models:/` registry URI. Each is resolved before any stage runs, stands in the run like a
reused stage with a content fingerprint (a rerun reuses what was built on it), and a bad one is exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import backbone_artifact

ROOT = Path(__file__).resolve().parents[1]
DATA = {"source": "digits", "train_subset": 160, "eval_subset": 80}


def _evaluate(name: str, inp: str) -> dict:
    return {"name": name, "kind": "evaluate", "input": inp, "tsne": False, "clusters": 4, "knn_k": 5,
            "html_report": False}


def test_artifact_folder_and_pretrained_inputs_are_fingerprinted_by_content(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.backbones import build_backbone, read_backbone_meta
    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    artifact = backbone_artifact(tmp_path)
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "start.safetensors"))
    cfg = validate_config({
        "name": "inputs", "data": DATA,
        "backbone": {"name": "resnet18", "weights": str(tmp_path / "start.safetensors"), "image_size": 16},
        "stages": [_evaluate("folder", str(artifact)), _evaluate("start", "pretrained")]})
    first = PipelineRun(cfg, tmp_path / "out", log=lambda m: None).run()
    assert first["reused_stages"] == [] and set(first["stages"]) == {"folder", "start"}
    built = next((tmp_path / "out" / "inputs").glob("pretrained-resnet18-*"))
    meta = read_backbone_meta(built)
    assert meta["weights"]["source"] == "file" and meta["mean"] == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
    assert 0.0 <= first["stages"]["start"]["metrics"]["knn_accuracy"] <= 1.0
    again = PipelineRun(cfg, tmp_path / "out", log=lambda m: None).run()
    assert sorted(again["reused_stages"]) == ["folder", "start"]  # same artifacts, same fingerprints
    # another artifact in the same folder: the stage on it is no longer the same
    backbone_artifact(tmp_path, name="resnet34")
    moved = validate_config({**cfg.model_dump(mode="json"),
                             "stages": [_evaluate("folder", str(tmp_path / "artifact-resnet34")),
                                        _evaluate("start", "pretrained")]})
    third = PipelineRun(moved, tmp_path / "out", log=lambda m: None).run()
    assert third["reused_stages"] == ["start"]


def test_pretrained_input_needs_weights():
    from pipeline.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="input 'pretrained' is the configured backbone with its weights"):
        validate_config({"name": "x", "data": DATA, "stages": [_evaluate("e", "pretrained")]})


def test_registry_input_trains_and_a_missing_alias_is_exit_2(tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.registry import register_backbone, registry_client
    from pipeline.runner import PipelineRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("reg", artifact_location=str(tmp_path / "mlruns")))
    version = register_backbone(uri, run.info.run_id, backbone_artifact(tmp_path), "start", {"sslpipe.stage": "x"})
    client.set_terminated(run.info.run_id)
    registry_client(uri).set_registered_model_alias("start", "champion", version)

    config = {"name": "from-registry", "data": DATA, "tracking": {"uri": uri},
              "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": 16},
              "ray": {"num_workers": 2}, "registry": {"enabled": False},
              "stages": [{"name": "adapt", "kind": "pretext", "method": "rotation", "epochs": 1, "batch_size": 32,
                          "evaluate": False, "input": "models:/start@champion"}]}
    summary = PipelineRun(validate_config(config), tmp_path / "out", log=lambda m: None).run()
    stage = summary["stages"]["adapt"]
    assert stage["input"] == "models:/start@champion" and stage["metrics"]["epoch"] == 1
    meta = json.loads((Path(stage["artifacts"]["backbone"]) / "backbone.json").read_text())
    assert meta["stage_config"]["input"] == "models:/start@champion"

    config["stages"][0]["input"] = "models:/start@nobody"
    (tmp_path / "bad.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "bad.json"), "--dry-run",
                           "--output-dir", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "has no alias 'nobody'" in done.stderr + done.stdout and "Traceback" not in done.stderr
