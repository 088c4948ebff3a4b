"""Model registry and `sslpipe retrain`: promote, keep and no-op, with real MLflow alias moves.

One small labelled image folder grows between retrains (new data, same config). Its labels carry no
information (both class folders hold images from one distribution) and it has no train/test split, so the
evaluation split is the training split: the real evaluations must sit near chance, not near 1.0 as when every
kNN query found its own image in the bank. The first retrain is judged by the real evaluation; later ones fake
only the metric values the gate sees (keyed by the data the backbone saw), so that promote and keep do not
depend on how well a one-epoch backbone happens to train, while the real values are still computed and checked.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config, validate_config
from pipeline.retrain import METRIC_MODES, gate

CONFIG = textwrap.dedent(
    """
    name: retrain-test
    seed: 0
    data: {{source: folder, root: {root}, load_size: 16}}
    backbone: {{name: test_resnet, small_image_stem: false, image_size: 16}}
    ray: {{num_workers: 2, max_failures: 0}}
    registry: {{model_name: tiny-backbone, metric: knn_accuracy, min_improvement: 0.05}}
    stages:
      - {{name: simclr, kind: pretext, method: simclr, epochs: 1, batch_size: 32, evaluate: false,
          log_every_steps: 100, settings: {{augment: {{gaussian_blur: 0.0}}}}}}
    """
)


def add_images(root: Path, start: int, count: int) -> None:
    """Two class folders of images from ONE distribution (colour and stripe direction drawn at random for each
    image, whatever its folder): the labels carry no information, so kNN accuracy is at chance (1/2)."""
    rng = np.random.default_rng(start)
    looks = [((200, 40, 40), 0), ((40, 40, 200), 1), ((200, 40, 40), 1), ((40, 40, 200), 0)]
    for cls in ("red", "blue"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            colour, axis = looks[int(rng.integers(0, len(looks)))]
            img = rng.integers(0, 60, (16, 16, 3)).astype(np.int32) + np.array(colour)
            stripes = (np.arange(16) % 4 < 2)[:, None] if axis == 0 else (np.arange(16) % 4 < 2)[None, :]
            img = np.where(stripes[..., None], img, img // 2)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / cls / f"{i:03d}.png")


def chance_bound(images: int, classes: int = 2, sigmas: float = 4.0) -> float:
    """Chance accuracy plus `sigmas` binomial standard deviations over `images` queries."""
    p = 1.0 / classes
    return p + sigmas * math.sqrt(p * (1 - p) / images)


def count_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def versions(uri: str, name: str) -> dict[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {str(v.version): v.tags for v in client.search_model_versions(f"name = '{name}'")}


def champion_version(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, "champion").version)


@pytest.mark.ray
def test_retrain_promotes_keeps_and_skips(ray_session, tmp_path, monkeypatch, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import evaluate as evaluation
    from pipeline import retrain as retraining
    from pipeline.backbones import load_backbone, read_backbone_meta
    from pipeline.cli import main

    data, out = tmp_path / "images", tmp_path / "out"
    add_images(data, 0, 32)
    config_path = tmp_path / "retrain.yaml"
    config_path.write_text(CONFIG.format(root=data))
    config = load_config(config_path)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    real_evaluate = retraining.evaluate_backbone
    evaluated: list[str] = []

    def recording_evaluate(artifact, *args, **kwargs):
        evaluated.append(read_backbone_meta(artifact)["data_fingerprint"])
        return real_evaluate(artifact, *args, **kwargs)

    real_quick = evaluation.quick_evaluate
    quick: list[dict[str, float]] = []  # every real evaluation: what evaluate_backbone read its metric from

    def recording_quick(*args, **kwargs):
        quick.append(real_quick(*args, **kwargs))
        return quick[-1]

    # 1. No champion yet: the first candidate is promoted (real evaluation).
    monkeypatch.setattr(evaluation, "quick_evaluate", recording_quick)
    monkeypatch.setattr(retraining, "evaluate_backbone", recording_evaluate)
    first = retraining.retrain(config, out, log=lambda s: None)
    assert first["decision"] == "promote" and first["champion"] is None
    assert first["warm_start"] is None and "warm_start_skipped" not in first  # warm_start is off by default
    assert first["candidate"]["version"] == "1" and champion_version(uri, "tiny-backbone") == "1"
    # 64 images, 2 uninformative classes: kNN below 1/2 + 4 * sqrt(1/4 / 64) = 0.75 (the leak scored ~1.0).
    assert 0.0 <= first["candidate"]["knn_accuracy"] < chance_bound(64) and len(evaluated) == 1
    # It excluded every query's own image (the folder has no split: each of the 64 queries is in the bank once).
    assert [q["knn_excluded_matches"] for q in quick] == [64.0]
    assert quick[0]["knn_accuracy"] == first["candidate"]["knn_accuracy"]
    fp1 = first["candidate"]["data_fingerprint"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retrain"]["decision"] == "promote" and summary["registry"]["version"] == "1"
    tags = versions(uri, "tiny-backbone")["1"]
    assert tags["sslpipe.data_fingerprint"] == fp1 == summary["data_fingerprint"]
    assert tags["sslpipe.retrain.decision"] == "promote"
    # The registered model loads through MLflow (code + safetensors, no pickle) and embeds like the artifact.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-backbone@champion")
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    reference = load_backbone(summary["stages"]["simclr"]["artifacts"]["backbone"], with_meta=True)
    from pretext.embeddings import embed_images

    meta = reference[1]
    expected = embed_images(reference[0], images, input_size=16, mean=meta["mean"], std=meta["std"],
                            in_chans=meta["in_chans"], input_transform=meta.get("input_transform", "rgb"), device="cpu")
    np.testing.assert_allclose(pyfunc.predict(images), expected, rtol=1e-4, atol=1e-5)

    # 2. Same data, same config: nothing runs, nothing is registered (through the CLI).
    runs_before = count_runs(uri)
    capsys.readouterr()
    assert main(["retrain", str(config_path), "--output-dir", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert count_runs(uri) == runs_before and set(versions(uri, "tiny-backbone")) == {"1"}

    # 3. New data; the candidate beats the champion by more than the margin: the alias moves.
    add_images(data, 32, 8)
    scores = {fp1: 0.50}
    real: dict[str, float] = {}

    def scored(artifact, *a, **k):
        """The gate sees the fake score; the real evaluation of the same backbone is kept for the checks."""
        fp = read_backbone_meta(artifact)["data_fingerprint"]
        real[fp] = real_evaluate(artifact, *a, **k)
        return scores.get(fp, 0.90)

    monkeypatch.setattr(retraining, "evaluate_backbone", scored)
    second = retraining.retrain(config, out, log=lambda s: None)
    assert second["decision"] == "promote", second
    assert second["warm_start"] is None and "warm_start_skipped" not in second  # off: a fresh init, as before
    assert json.loads((out / "summary.json").read_text())["stages"]["simclr"]["input"] is None
    # The real evaluations of champion (v1) and candidate (v2) on the 80 images: both near chance, so on these
    # labels neither can beat the other by min_improvement through self-matches.
    assert set(real) == {fp1, second["candidate"]["data_fingerprint"]}, real
    assert all(0.0 <= v < chance_bound(80) for v in real.values()), real
    assert [q["knn_excluded_matches"] for q in quick[1:]] == [80.0, 80.0]
    print(f"real kNN accuracy at chance 0.5: v1 on 64 images {quick[0]['knn_accuracy']:.4f}; on 80 images: "
          + ", ".join(f"{q['knn_accuracy']:.4f}" for q in quick[1:]))
    # The gate as configured (knn_accuracy, higher is better, min_improvement 0.05) decided it.
    assert second["min_improvement"] == 0.05 and second["gain"] == pytest.approx(0.40)
    assert second["decision"] == gate(0.90, 0.50, 0.05, METRIC_MODES["knn_accuracy"])["decision"]
    assert second["champion"] == {"version": "1", "knn_accuracy": 0.5, "data_fingerprint": fp1,
                                  "config_fingerprint": first["candidate"]["config_fingerprint"]}
    assert second["candidate"]["version"] == "2" and second["candidate"]["knn_accuracy"] == 0.9
    assert second["candidate"]["data_fingerprint"] != fp1
    assert champion_version(uri, "tiny-backbone") == "2"
    fp2 = second["candidate"]["data_fingerprint"]

    # 4. Newer data; the candidate is better, but by less than min_improvement: the champion stays.
    add_images(data, 40, 8)
    scores[fp2] = 0.80
    monkeypatch.setattr(retraining, "evaluate_backbone",
                        lambda artifact, *a, **k: scores.get(read_backbone_meta(artifact)["data_fingerprint"], 0.83))
    third = retraining.retrain(config, out, log=lambda s: None)
    assert third["decision"] == "keep", third
    assert third["gain"] == pytest.approx(0.03) and "less than +0.0500" in third["reason"]
    assert third["champion"]["version"] == "2" and third["candidate"]["version"] == "3"
    assert champion_version(uri, "tiny-backbone") == "2"
    all_versions = versions(uri, "tiny-backbone")
    assert all_versions["3"]["sslpipe.retrain.decision"] == "keep"
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(json.loads((out / "summary.json").read_text())["parent_run_id"])
    assert parent.data.tags["sslpipe.retrain.decision"] == "keep"
    assert parent.data.tags["sslpipe.retrain.champion_version"] == "2"
    assert parent.data.tags["sslpipe.retrain.candidate_data_fingerprint"] == third["candidate"]["data_fingerprint"]
    assert parent.data.tags["sslpipe.retrain.champion_data_fingerprint"] == fp2
    assert parent.data.metrics["retrain_candidate_knn_accuracy"] == pytest.approx(0.83)
    assert parent.data.metrics["retrain_champion_knn_accuracy"] == pytest.approx(0.80)
    assert json.loads((out / "summary.json").read_text())["retrain"]["decision"] == "keep"

    # 5. The kept candidate was judged on exactly this data and config: no second try.
    runs_before = count_runs(uri)
    assert retraining.retrain(config, out, log=lambda s: None)["decision"] == "noop"
    assert count_runs(uri) == runs_before and set(versions(uri, "tiny-backbone")) == {"1", "2", "3"}


def test_registry_config_is_checked(tmp_path):
    base = {"name": "p", "data": {"source": "digits"},
            "stages": [{"name": "simclr", "kind": "pretext", "method": "simclr", "epochs": 1},
                       {"name": "evaluate", "kind": "evaluate", "input": "simclr"}]}
    cfg = validate_config(base)
    assert cfg.registered_stage() == "simclr" and cfg.model_name() == "p" and cfg.registry.alias == "champion"
    with pytest.raises(ConfigError, match="registry.stage: 'evaluate' is not a stage that produces a backbone"):
        validate_config({**base, "registry": {"stage": "evaluate"}})
    with pytest.raises(ConfigError, match=r"registry.min_improvement"):
        validate_config({**base, "registry": {"min_improvement": -0.1}})
    with pytest.raises(ConfigError, match=r"registry.metrc: unknown key"):
        validate_config({**base, "registry": {"metrc": "nmi"}})


def test_retrain_without_a_backbone_stage_exits_2(tmp_path, capsys):
    from pipeline.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("name: p\ndata: {source: digits}\nstages: [{name: pixels, kind: evaluate, input: pixels}]\n")
    assert main(["retrain", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "no stage of the pipeline produces a backbone" in capsys.readouterr().err


# The promote/keep gate, a pure function: min_improvement 0.05 with the 1e-12 float tolerance.
@pytest.mark.parametrize(("candidate", "champion", "min_improvement", "metric", "expected"), [
    (0.85, 0.80, 0.05, "knn_accuracy", "promote"),         # gain exactly 0.05 (0.0499999... in floats)
    (0.30, 0.25, 0.05, "knn_accuracy", "promote"),         # exactly at the margin again, other rounding
    (0.85 - 1e-9, 0.80, 0.05, "knn_accuracy", "keep"),     # just below the margin
    (0.90, 0.80, 0.05, "knn_accuracy", "promote"),         # above
    (0.80, 0.80, 0.0, "knn_accuracy", "promote"),          # min_improvement 0: a tie promotes
    (0.79, 0.80, 0.0, "knn_accuracy", "keep"),             # negative gain
    (0.70, 0.80, 0.05, "knn_accuracy", "keep"),            # negative gain
    (0.10, None, 0.05, "knn_accuracy", "promote"),         # no champion
    (0.62, 0.60, 0.02, "nmi", "promote"),                  # nmi, higher is better: at the margin
    (0.61, 0.60, 0.02, "nmi", "keep"),                     # nmi below the margin
    (0.55, 0.60, 0.02, "nmi", "keep"),                     # nmi got worse
    (float("nan"), 0.60, 0.0, "nmi", "keep"),              # a metric that is not a number never promotes
])
def test_gate_boundaries(candidate, champion, min_improvement, metric, expected):
    verdict = gate(candidate, champion, min_improvement, METRIC_MODES[metric])
    assert verdict["decision"] == expected, verdict
    if champion is None:
        assert verdict["gain"] is None and verdict["reason"] == "no champion yet"
    elif candidate == candidate:
        assert verdict["gain"] == pytest.approx(candidate - champion)


def test_gate_modes():
    import typing

    from pipeline.config import RegistryConfig

    assert set(METRIC_MODES) == {"knn_accuracy", "nmi"} and set(METRIC_MODES.values()) == {"max"}
    # every metric the config accepts has a mode
    assert set(typing.get_args(RegistryConfig.model_fields["metric"].annotation)) == set(METRIC_MODES)
    assert gate(0.40, 0.50, 0.05, "min")["decision"] == "promote"  # lower-is-better, for a future metric
    with pytest.raises(ValueError, match="mode"):
        gate(0.5, 0.4, 0.0, "up")


# Warm start: `registry.warm_start` starts the fresh-init stages from the champion.
WARM_BASE = {
    "name": "p", "data": {"source": "digits"},
    "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": 8},
    "registry": {"model_name": "m", "warm_start": True},
    "stages": [{"name": "simclr", "kind": "pretext", "method": "simclr", "epochs": 1},
               {"name": "refine", "kind": "refine", "input": "simclr", "epochs": 1},
               {"name": "metric", "kind": "metric", "epochs": 1},
               {"name": "probe", "kind": "finetune", "input": "simclr", "epochs": 1},
               {"name": "random", "kind": "finetune", "epochs": 1}],
}


def fake_champion(tmp_path: Path, version: str = "4", **meta):
    """A registered version (`.version`) and its artifact folder, of which warm_start reads only backbone.json."""
    from types import SimpleNamespace

    from pipeline.backbones import ARTIFACT_FORMAT

    folder = tmp_path / "champion"
    folder.mkdir(exist_ok=True)
    (folder / "backbone.json").write_text(json.dumps({
        "format": ARTIFACT_FORMAT, "timm_name": "resnet18", "timm_kwargs": {}, "small_image_stem": True,
        "stem_stride": 2, "in_chans": 3, **meta}))
    return SimpleNamespace(version=version), folder


def test_warm_start_rewrites_only_fresh_init_stages(tmp_path):
    from pipeline.registry import config_fingerprint
    from pipeline.retrain import warm_start

    cfg = validate_config(WARM_BASE)
    assert cfg.warm_start_stages() == ["simclr", "metric"] and cfg.champion_uri() == "models:/m@champion"
    champion, folder = fake_champion(tmp_path)
    warm_cfg, warm, why_not = warm_start(cfg, champion, folder)
    assert warm == {"from": "models:/m@champion", "version": "4", "stages": ["simclr", "metric"]} and why_not is None
    inputs = {s.name: getattr(s, "input", None) for s in warm_cfg.stages}
    # pretext and metric start from the champion; refine and the probe keep their stage input; a finetune
    # stage without input stays a random init (omitted means `random` there).
    assert inputs == {"simclr": "models:/m@champion", "refine": "simclr", "metric": "models:/m@champion",
                      "probe": "simclr", "random": None}
    assert [getattr(s, "input", None) for s in cfg.stages][0] is None  # the caller's config is untouched
    # The rewritten config is the same config for retrain's "nothing changed" check...
    assert config_fingerprint(warm_cfg) == config_fingerprint(cfg)
    # ...but not without warm start, where an explicit registry input is another training start.
    off = lambda c: c.model_copy(update={"registry": c.registry.model_copy(update={"warm_start": False})})  # noqa: E731
    assert config_fingerprint(off(warm_cfg)) != config_fingerprint(off(cfg))
    # With weights, their bytes count, not the path they were read from.
    moved = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"weights": "/elsewhere/w.safetensors"})})
    assert config_fingerprint(moved, "ab" * 32) == config_fingerprint(cfg, "ab" * 32)
    assert config_fingerprint(cfg, "cd" * 32) != config_fingerprint(cfg, "ab" * 32)
    # The rewritten config still validates (the registry URI is an external input).
    assert validate_config(warm_cfg.model_dump(mode="json")).stage("simclr").input == "models:/m@champion"

    # Off, nothing to start, no champion, another architecture: the config is unchanged; the reason says why.
    assert warm_start(off(cfg), champion, folder) == (off(cfg), None, None)
    for meta, expected in [({"timm_name": "resnet34"}, "has timm_name 'resnet34' where the config has 'resnet18'"),
                           ({"stem_stride": 1}, "has stem_stride 1 where the config has 2"),
                           ({"small_image_stem": False}, "has small_image_stem False"),
                           ({"in_chans": 1}, "takes 1 channel(s) where stage 'simclr' needs 3")]:
        champion, folder = fake_champion(tmp_path, **meta)
        same, warm, why_not = warm_start(cfg, champion, folder)
        assert same is cfg and warm is None and expected in why_not and "version 4" in why_not, why_not
    same, warm, why_not = warm_start(cfg, None, None)
    assert same is cfg and warm is None and why_not.startswith("no champion yet")
    no_fresh = validate_config({**WARM_BASE, "stages": [{**WARM_BASE["stages"][0], "input": "pretrained"}]
                                + WARM_BASE["stages"][1:2], "backbone": {"pretrained": True}})
    assert warm_start(no_fresh, *fake_champion(tmp_path))[2].startswith("no pretext or metric stage")


WARM_CONFIG = textwrap.dedent(
    """
    name: warm-test
    seed: 0
    data: {{source: folder, root: {root}, load_size: 16}}
    backbone: {{name: test_resnet, small_image_stem: false, image_size: 16}}
    ray: {{num_workers: 1, max_failures: 0}}
    registry: {{model_name: warm-backbone, warm_start: true}}
    stages:
      - {{name: simclr, kind: pretext, method: simclr, epochs: 1, batch_size: 32, evaluate: false,
          log_every_steps: 100, optimizer: {{name: adamw, lr: 1.0e-2, weight_decay: 0.0}},
          settings: {{augment: {{gaussian_blur: 0.0}}}}}}
    """
)


def parameters(artifact: str | Path) -> dict[str, np.ndarray]:
    """The trained tensors of an artifact (BatchNorm running statistics move with every forward pass)."""
    from safetensors.numpy import load_file

    state = load_file(str(Path(artifact) / "model.safetensors"))
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.ray
def test_retrain_warm_starts_from_the_champion(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.retrain import retrain

    data, out = tmp_path / "images", tmp_path / "out"
    add_images(data, 0, 16)
    path = tmp_path / "warm.yaml"
    path.write_text(WARM_CONFIG.format(root=data))
    uri, name = f"sqlite:///{out / 'mlflow.db'}", "warm-backbone"
    logs: list[str] = []

    # 1. No champion yet: trained from scratch, and the decision says so.
    first = retrain(load_config(path), out, log=logs.append)
    assert first["decision"] == "promote" and first["warm_start"] is None, first
    assert first["warm_start_skipped"].startswith("no champion yet")
    assert any(line.startswith("retrain: no warm start: no champion yet") for line in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["simclr"]["input"] is None
    champion = parameters(summary["stages"]["simclr"]["artifacts"]["backbone"])

    # 2. New data, lr 1e-9 and another seed: the stage starts from version 1's weights, so it ends within
    # 1e-6 of them (a fresh init of seed 1 would be nowhere near a backbone trained from seed 0 at lr 1e-2).
    add_images(data, 16, 4)
    second_cfg = load_config(path, ["seed=1", "stages.simclr.optimizer.lr=1.0e-9"])
    second = retrain(second_cfg, out, log=logs.append)
    assert second["warm_start"] == {"from": "models:/warm-backbone@champion", "version": "1",
                                    "stages": ["simclr"]}, second
    assert "warm_start_skipped" not in second and second["candidate"]["version"] == "2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retrain"]["warm_start"] == second["warm_start"]
    assert summary["stages"]["simclr"]["input"] == "models:/warm-backbone@champion"
    assert summary["stages"]["simclr"]["reused"] is False
    candidate = parameters(summary["stages"]["simclr"]["artifacts"]["backbone"])
    assert candidate.keys() == champion.keys()
    drift = max(float(np.abs(candidate[k] - champion[k]).max()) for k in champion)
    assert drift < 1e-6, drift
    import torch

    from pipeline.backbones import build_backbone

    torch.manual_seed(1000)  # what a fresh start of rank 0 at seed 1 would have been: far from the champion
    fresh = {k: v.numpy() for k, v in build_backbone("test_resnet", small_image_stem=False)[0].state_dict().items()}
    assert max(float(np.abs(fresh[k] - champion[k]).max()) for k in champion) > 1e-3
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_run(summary["parent_run_id"]).data.tags
    assert tags["sslpipe.retrain.warm_start_from"] == "models:/warm-backbone@champion"
    assert tags["sslpipe.retrain.warm_start_version"] == "1"
    assert versions(uri, name)["2"]["sslpipe.retrain.warm_start_version"] == "1"
    stage_run = client.get_run(summary["stages"]["simclr"]["run_id"])
    assert stage_run.data.tags["sslpipe.input"] == "models:/warm-backbone@champion"
    print(f"warm start: largest parameter change from champion v1 after one epoch at lr 1e-9: {drift:.2e}")

    # 3. Same data, same config: nothing to do (the warm-start input does not change the config fingerprint).
    third = retrain(second_cfg, out, log=logs.append)
    assert third["decision"] == "noop", third
    assert set(versions(uri, name)) == {"1", "2"}
