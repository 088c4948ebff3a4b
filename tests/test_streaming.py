"""The `stream` data backend: a pixel cache built by Ray Data gives exactly what the `memory` backend gives.

Same folder, both backends: the same rows, pixels, labels, skipped files, fingerprint and normalisation; the
cache is reused without Ray and rebuilt after a `touch` with the same fingerprint; a Ray Data worker killed
mid-build loses and repeats no row; a pipeline trains and evaluates on it like on memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.ray


def make_folder(root: Path, per_class: int = 9, classes: tuple[str, ...] = ("cats", "dogs", "owls")) -> None:
    """Labeled JPEG/PNG photos of different sizes plus two unreadable files."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 48, size=2)
            base = np.full((h, w, 3), 60 * c, dtype=np.uint8)
            image = np.clip(base + rng.integers(0, 120, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "cats" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "dogs" / "empty.png").write_bytes(b"")


def stream_split(root: Path, cache: Path, ray_session, logs=None, **data):
    from pipeline.config import validate_config
    from pipeline.context import load_split

    cfg = validate_config({"name": "s", "data": {"source": "folder", "root": str(root), "load_size": 16,
                                                 "backend": "stream", **data},
                           "stages": [{"name": "pixels", "kind": "evaluate", "input": "pixels"}]})
    started = []
    out = load_split(cfg, "train", (logs if logs is not None else []).append, cache_root=cache,
                     start_ray=lambda: started.append(True))
    return out, bool(started)


def test_stream_equals_memory_and_cache_is_reused(tmp_path, ray_session):
    from pipeline.data import load_images
    from pipeline.pixel_cache import META_FILE

    make_folder(tmp_path / "imgs")
    memory = load_images("folder", "train", root=str(tmp_path / "imgs"), image_size=16, log=lambda m: None)
    streamed, started = stream_split(tmp_path / "imgs", tmp_path / "cache", ray_session)
    assert started
    assert not isinstance(streamed.images, np.ndarray) and streamed.images.shape == memory.images.shape == (27, 3, 16, 16)
    np.testing.assert_array_equal(streamed.images[np.arange(27)], memory.images)
    np.testing.assert_array_equal(streamed.images[5:9], memory.images[5:9])
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    assert streamed.ids == memory.ids and streamed.class_names == memory.class_names == ["cats", "dogs", "owls"]
    assert sorted(p for p, _ in streamed.skipped) == sorted(p for p, _ in memory.skipped)
    assert dict(streamed.skipped) == dict(memory.skipped)  # the same reasons, from the same decoder
    assert streamed.fingerprint() == memory.fingerprint()
    assert streamed.pixel_moments().stats(3) == memory.pixel_moments().stats(3)
    np.testing.assert_allclose(streamed.pixel_moments().stats(1), memory.pixel_moments().stats(1), rtol=1e-12)

    # A rerun reuses the cache without starting Ray; a subset view reads only its rows.
    logs: list[str] = []
    again, started = stream_split(tmp_path / "imgs", tmp_path / "cache", ray_session, logs)
    assert not started and any("reusing" in line for line in logs)
    assert again.fingerprint() == memory.fingerprint()
    sub = again.subset([3, 1, 20])
    np.testing.assert_array_equal(np.asarray(sub.images), memory.images[[3, 1, 20]])

    # `touch` changes the listing: the cache is rebuilt, the data fingerprint (pixels) stays.
    first = next((tmp_path / "imgs" / "owls").glob("*.png"))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    touched, started = stream_split(tmp_path / "imgs", tmp_path / "cache", ray_session)
    assert started and touched.fingerprint() == memory.fingerprint()
    assert len([d for d in (tmp_path / "cache").iterdir() if (d / META_FILE).exists()]) == 2


def test_killed_decode_worker_loses_and_repeats_no_row(tmp_path, ray_session, monkeypatch):
    """A Ray Data worker process dies mid-pass (os._exit in one decode task): Ray Data retries the task, and
    the cache holds every readable row exactly once."""
    from pipeline import pixel_cache
    from pipeline.data import load_images

    make_folder(tmp_path / "imgs", per_class=20)
    marker = tmp_path / "kill-once"
    marker.write_text("")
    monkeypatch.setenv(pixel_cache.KILL_DECODE, str(marker))
    monkeypatch.setattr(pixel_cache, "ROWS_PER_SHARD", 8)  # several tasks: one dies, the rest go on
    streamed, _ = stream_split(tmp_path / "imgs", tmp_path / "cache", ray_session)
    assert not marker.exists() and (tmp_path / "kill-once.taken").exists()  # a worker did exit
    memory = load_images("folder", "train", root=str(tmp_path / "imgs"), image_size=16, log=lambda m: None)
    assert len(streamed) == len(memory) == 60
    assert len(set(streamed.ids)) == 60 and streamed.ids == memory.ids
    np.testing.assert_array_equal(np.asarray(streamed.images), memory.images)
    assert len(streamed.images.shard_files) == 8


def test_interrupted_build_is_rebuilt(tmp_path, ray_session):
    """A build folder left by a crash (no meta.json) is not taken for a cache: the next run builds afresh."""
    from pipeline.image_files import list_folder
    from pipeline.pixel_cache import cache_key

    make_folder(tmp_path / "imgs")
    listing = list_folder(str(tmp_path / "imgs"), "train", log=lambda m: None)
    key = cache_key(listing, 16, 89_478_485)
    (tmp_path / "cache" / f"{key}.building-dead").mkdir(parents=True)
    (tmp_path / "cache" / key).mkdir()  # renamed into place but incomplete
    streamed, started = stream_split(tmp_path / "imgs", tmp_path / "cache", ray_session)
    assert started and len(streamed) == 27
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key]


def test_pipeline_trains_and_evaluates_the_same_on_both_backends(tmp_path, ray_session):
    """Same config, `memory` vs `stream`: same data fingerprint and steps per epoch, the same losses and the same
    evaluation metrics (float tolerance), and the streamed workers read pixels from the cache, not the object
    store."""
    import json

    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    make_folder(tmp_path / "imgs", per_class=24)
    results = {}
    for backend in ("memory", "stream"):
        cfg = validate_config({
            "name": f"both-{backend}", "seed": 0,
            "data": {"source": "folder", "root": str(tmp_path / "imgs"), "load_size": 16, "backend": backend},
            "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": 16},
            "ray": {"num_workers": 2},
            "stages": [
                {"name": "rotation", "kind": "pretext", "method": "rotation", "epochs": 2, "batch_size": 16,
                 "evaluate": False},
                {"name": "evaluate", "kind": "evaluate", "input": "rotation", "tsne": False, "clusters": 3,
                 "knn_k": 5},
            ]})
        logs: list[str] = []
        summary = PipelineRun(cfg, tmp_path / backend, log=logs.append).run()
        results[backend] = (summary, logs)
    (mem, mem_logs), (stream, stream_logs) = results["memory"], results["stream"]
    assert any("pixel cache: decoding" in line for line in stream_logs)
    assert not any("pixel cache" in line for line in mem_logs)
    assert (tmp_path / "stream" / "pixel_cache").is_dir()
    assert mem["data_fingerprint"] == stream["data_fingerprint"]
    m_train, s_train = mem["stages"]["rotation"]["metrics"], stream["stages"]["rotation"]["metrics"]
    assert m_train["steps_per_epoch"] == s_train["steps_per_epoch"] > 0
    assert s_train["loss"] == pytest.approx(m_train["loss"], rel=1e-4, abs=1e-5)
    m_eval, s_eval = mem["stages"]["evaluate"]["metrics"], stream["stages"]["evaluate"]["metrics"]
    for key in ("knn_accuracy", "nmi", "kmeans_inertia"):
        assert s_eval[key] == pytest.approx(m_eval[key], rel=1e-4, abs=1e-5), key
    embeddings = [np.load(r["stages"]["evaluate"]["artifacts"]["embeddings"]) for r in (mem, stream)]
    np.testing.assert_allclose(embeddings[1], embeddings[0], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "stream" / "summary.json").read_text())["stages"].keys() == {"rotation", "evaluate"}
