"""`sslpipe embed` and `sslpipe export`, and backbones named by stage or by model registry URI.

A small folder is an in-memory split, embedded in this process; one test (on the shared Ray head) streams it
through the pixel cache and the Ray Data actor pool instead.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import MmapImages, backbone_artifact
from PIL import Image

from pipeline import export
from pipeline.backbone_ref import resolve_backbone
from pipeline.backbones import BackboneError, load_backbone, read_backbone_meta
from pipeline.cli import main
from pipeline.embed import data_config, embed_split, write_parquet
from pipeline.evaluate import backbone_features
from pipeline.image_files import decode_file


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return backbone_artifact(tmp_path_factory.mktemp("backbone"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two class folders of 20x20 PNGs and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 4), ("dog", 3)):
        (root / cls).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    return root


def readable_paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png") if p.name != "broken.png")


def expected_features(artifact: Path, paths: list[str]) -> np.ndarray:
    """backbone_features in this process, on the same decoded pixels (the backbone's 16 px input size)."""
    images = np.stack([decode_file(p, 16, 10**8, Path(p).stat().st_size)[0] for p in paths])
    return backbone_features(artifact, images, batch_size=4)


def test_embed_folder_to_parquet(artifact, folder, tmp_path):
    out = tmp_path / "emb.parquet"
    data = data_config(source="folder", root=str(folder), load_size=16)
    result = embed_split(artifact, data, out, batch_size=3, log=lambda m: None)
    table = pq.read_table(out)
    paths = readable_paths(folder)
    assert result["rows"] == table.num_rows == len(paths) == 7  # the broken file is not a row
    assert table.column("id").to_pylist() == paths
    assert table.column("label").to_pylist() == [0, 0, 0, 0, 1, 1, 1]
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert got.shape == (7, 512) and table.schema.field("embedding").type.list_size == 512
    np.testing.assert_allclose(got, expected_features(artifact, paths), atol=1e-5, rtol=0)
    meta = table.schema.metadata
    assert json.loads(meta[b"sslpipe.class_names"]) == ["cat", "dog"]
    assert json.loads(meta[b"sslpipe.backbone_meta"])["feature_dim"] == 512
    skipped = (tmp_path / "emb.skipped.tsv").read_text().splitlines()
    assert skipped[0] == "path\treason" and len(skipped) == 2
    assert skipped[1].startswith(f"{folder / 'dog' / 'broken.png'}\t")


def test_embed_cli_writes_npy_and_ids(artifact, folder, tmp_path, sslpipe_cmd):
    """Through the console script: exit 0, .npy + .ids.txt + .labels.npy, skipped file named on stderr."""
    out = tmp_path / "sub" / "emb.npy"
    proc = subprocess.run([*sslpipe_cmd, "embed", "--backbone", str(artifact), "--root", str(folder),
                           "--out", str(out), "--batch-size", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.png" in proc.stderr and "embedded 7 images (512 dims)" in proc.stdout
    paths = readable_paths(folder)
    assert (tmp_path / "sub" / "emb.ids.txt").read_text().splitlines() == paths
    assert np.load(tmp_path / "sub" / "emb.labels.npy").tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert (tmp_path / "sub" / "emb.skipped.tsv").is_file()
    # no --load-size: folder images are decoded at the backbone's input size (16 px)
    np.testing.assert_allclose(np.load(out), expected_features(artifact, paths), atol=1e-5, rtol=0)


def test_embed_bad_inputs_exit_2(artifact, folder, tmp_path, capsys):
    out = str(tmp_path / "emb.parquet")
    assert main(["embed", "--backbone", str(tmp_path / "missing"), "--root", str(folder), "--out", out]) == 2
    assert "no such artifact folder" in capsys.readouterr().err
    assert main(["embed", "--backbone", str(artifact), "--root", str(folder), "--out", str(tmp_path / "e.csv")]) == 2
    assert "must end in .parquet or .npy" in capsys.readouterr().err
    assert main(["embed", "--backbone", str(artifact), "--root", str(tmp_path / "none"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", "--backbone", "simclr", "--root", str(folder), "--out", out]) == 2
    assert "a stage name needs --run-dir" in capsys.readouterr().err


def test_parquet_is_written_in_row_groups_from_a_memory_map(tmp_path):
    """A streamed split's embeddings are a memory map: the writer reads them a row group at a time."""
    features = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    mapped = MmapImages.save(tmp_path / "f.npy", features, max_rows=3)  # a read of more than 3 rows fails
    ids = [f"img{i}" for i in range(10)]
    write_parquet(tmp_path / "e.parquet", mapped, ids, None, {}, rows_per_group=3)
    parquet = pq.ParquetFile(tmp_path / "e.parquet")
    assert parquet.metadata.num_row_groups == 4 and parquet.schema_arrow.names == ["id", "embedding"]
    table = parquet.read()
    assert table.column("id").to_pylist() == ids
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), features)


def test_stage_folder_and_stage_name_resolve(artifact, tmp_path):
    run = tmp_path / "run"
    stage = run / "stages" / "simclr"
    stage.mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"kind": "pretext", "artifacts": {"backbone": str(artifact)}}))
    assert resolve_backbone(str(stage), scratch=tmp_path) == artifact
    assert resolve_backbone("simclr", scratch=tmp_path, run_dir=run) == artifact
    with pytest.raises(BackboneError, match="no finished stage 'byol'"):
        resolve_backbone("byol", scratch=tmp_path, run_dir=run)


def test_registry_uri_resolves_to_the_artifact(artifact, tmp_path, capsys):
    """models:/NAME@ALIAS and models:/NAME/VERSION -> the registered artifact; a missing alias, model or version
    is exit 2 with a message that names it."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry import register_backbone, registry_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("reg", artifact_location=str(tmp_path / "mlruns")))
    version = register_backbone(uri, run.info.run_id, artifact, "embedder", {"sslpipe.stage": "simclr"})
    client.set_terminated(run.info.run_id)
    registry_client(uri).set_registered_model_alias("embedder", "champion", version)

    found = resolve_backbone("models:/embedder@champion", scratch=tmp_path / "dl", tracking_uri=uri)
    assert read_backbone_meta(found) == read_backbone_meta(artifact)
    assert (found / "model.safetensors").read_bytes() == (artifact / "model.safetensors").read_bytes()
    by_version = resolve_backbone(f"models:/embedder/{version}", scratch=tmp_path / "dl2", tracking_uri=uri)
    assert read_backbone_meta(by_version) == read_backbone_meta(artifact)

    out = str(tmp_path / "m.safetensors")
    common = ["--format", "safetensors", "--out", out, "--tracking-uri", uri]
    assert main(["export", "--backbone", "models:/embedder@champion", *common]) == 0
    assert export.read_safetensors_meta(Path(out)) == read_backbone_meta(artifact)
    capsys.readouterr()
    for spec, message in (("models:/embedder@nope", "model 'embedder' has no alias 'nope'"),
                          ("models:/other@champion", "no registered model 'other'"),
                          ("models:/embedder/9", "model 'embedder' has no version 9"),
                          ("models:/embedder", "malformed model registry URI")):
        assert main(["export", "--backbone", spec, *common]) == 2, spec
        assert message in capsys.readouterr().err
    assert main(["export", "--backbone", "models:/embedder@champion", "--format", "safetensors", "--out", out,
                 "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_export_safetensors_one_file_with_metadata(artifact, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "backbone.safetensors"
    assert main(["export", "--backbone", str(artifact), "--format", "safetensors", "--out", str(out)]) == 0
    assert export.read_safetensors_meta(out) == read_backbone_meta(artifact)
    got, want = load_file(str(out)), load_file(str(artifact / "model.safetensors"))
    assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want)


def test_export_onnx_matches_torch_or_names_the_missing_packages(artifact, tmp_path, capsys):
    """With onnx and onnxruntime installed: the graph (normalization inside) equals torch within 1e-4 on RGB
    input in [0, 1], at a batch size other than the one exported. Without them: exit 2 naming them."""
    out = tmp_path / "backbone.onnx"
    code = main(["export", "--backbone", str(artifact), "--format", "onnx", "--out", str(out)])
    missing = export.missing_packages()
    if missing:
        assert code == 2 and not out.exists()
        err = capsys.readouterr().err
        assert all(name in err for name in missing) and "pip install" in err
        return
    assert code == 0, capsys.readouterr().err
    import onnxruntime as ort
    import torch

    model, meta = load_backbone(artifact, with_meta=True)
    rgb = np.random.default_rng(3).random((5, 3, 16, 16), dtype=np.float32)
    mean, std = np.array(meta["mean"], np.float32)[:, None, None], np.array(meta["std"], np.float32)[:, None, None]
    with torch.no_grad():
        want = model(torch.from_numpy((rgb - mean) / std)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": rgb})[0]
    assert np.abs(got - want).max() <= 1e-4


def test_embed_streamed_split_on_the_cluster(ray_session, artifact, folder, tmp_path):
    """backend: stream -> pixel cache, Ray Data actors, Parquet from the memory map: same rows and values."""
    out = tmp_path / "emb.parquet"
    data = data_config(source="folder", root=str(folder), load_size=16, backend="stream")
    result = embed_split(artifact, data, out, batch_size=3, log=lambda m: None)
    assert result["streamed"] and ray_session.is_initialized()  # the session's Ray is left running
    table = pq.read_table(out)
    paths = readable_paths(folder)
    assert table.column("id").to_pylist() == paths
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, expected_features(artifact, paths), atol=1e-5, rtol=0)
    skipped = (tmp_path / "emb.skipped.tsv").read_text().splitlines()
    assert len(skipped) == 2 and skipped[1].startswith(f"{folder / 'dog' / 'broken.png'}\t")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".emb.parquet.")]  # the scratch map is gone
