"""Config validation: bad keys and values stop the run with exit code 2 and a message naming the key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, apply_override, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]

GOOD = textwrap.dedent(
    """
    name: t
    data: {source: digits, train_subset: 100}
    stages:
      - {name: simclr, kind: pretext, method: simclr, epochs: 2}
      - {name: ev, kind: evaluate, input: simclr}
    """
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_defaults_and_settings_are_resolved(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    simclr = cfg.stage("simclr")
    assert simclr.settings["temperature"] == 0.5
    assert simclr.settings["augment"]["min_scale"] == 0.08
    assert cfg.ray.num_workers == 2


def test_override_by_stage_name_and_index(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["stages.simclr.epochs=5", "stages.1.knn_k=7",
                                              "stages.simclr.settings.temperature=0.3", "ray.num_workers=1"])
    assert cfg.stage("simclr").epochs == 5
    assert cfg.stage("ev").knn_k == 7
    assert cfg.stage("simclr").settings["temperature"] == 0.3
    assert cfg.ray.num_workers == 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("stages.simclr.epoch=3", "stages[simclr].epoch: unknown key"),
        ("stages.simclr.optimizer.lr=-1", "stages[simclr].optimizer.lr"),
        ("stages.simclr.settings.temprature=0.1", "stages[simclr].settings.temprature: unknown key"),
        ("stages.simclr.settings.temperature=abc", "stages[simclr].settings.temperature"),
        ("stages.simclr.method=simclrr", "unknown pretext method 'simclrr'"),
        ("data.source=imagenet", "data.source"),
        ("ray.num_workers=0", "ray.num_workers"),
        ("stages.ev.input=nope", "input 'nope' is not an earlier stage"),
        ("stages.ev.features=head", "stages[ev].features"),
    ],
)
def test_errors_name_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), [override])
    assert expected in str(info.value)


def test_backbone_features_need_a_backbone(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), ["stages.ev.input=pixels", "stages.ev.features=backbone"])
    assert "features: backbone needs a backbone input, not 'pixels'" in str(info.value)
    assert load_config(write(tmp_path, GOOD), ["stages.ev.features=backbone"]).stage("ev").features == "backbone"


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD), ["stages.simclr.epoch=3"])
    assert "did you mean 'epochs'" in str(info.value)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "novalue")


def test_flatten_keys_stages_by_name(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    flat = flatten(cfg.model_dump(mode="json"))
    assert flat["stages.simclr.epochs"] == 2
    assert flat["data.source"] == "digits"


def test_cli_exit_code_2_and_message(tmp_path):
    path = write(tmp_path, GOOD.replace("epochs: 2", "epochs: 2, batch_sise: 3"))
    proc = run_cli("run", str(path))
    assert proc.returncode == 2
    assert "stages[simclr].batch_sise: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_yaml_syntax_error_and_missing_file(tmp_path):
    proc = run_cli("run", str(write(tmp_path, "data: [unclosed\n")))
    assert proc.returncode == 2 and "YAML syntax error at line" in proc.stderr
    proc = run_cli("run", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file not found" in proc.stderr


def test_config_errors_do_not_import_the_heavy_stack(tmp_path):
    """`--help` and config errors must answer fast: torch, ray and mlflow stay unimported."""
    path = write(tmp_path, GOOD.replace("epochs: 2", "epochs: -2"))
    code = textwrap.dedent(
        f"""
        import sys
        from pipeline.cli import main
        rc = main(["run", {str(path)!r}])
        heavy = [m for m in ("torch", "ray", "mlflow", "timm", "lightly") if m in sys.modules]
        print("RC", rc, "HEAVY", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "RC 2 HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_resolved_config_round_trips(tmp_path):
    from pipeline.config import dump_config, validate_config
    import yaml

    cfg = load_config(write(tmp_path, GOOD))
    again = validate_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
