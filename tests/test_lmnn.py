"""LMNN: a learned distance that discounts a noise feature, k-means in its space; a config without labels is
exit 2."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _noisy_classes(n: int = 300, seed: int = 0):
    """Column 0 separates 3 classes (spacing 1.5, spread 0.3); columns 1-4 are noise (std 2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    signal = labels * 1.5 + rng.normal(0, 0.3, n)
    return np.concatenate([signal[:, None], rng.normal(0, 2.0, (n, 4))], axis=1), labels


def test_lmnn_shrinks_the_noise_features_and_beats_euclidean():
    from downstream.lmnn import fit_lmnn
    from downstream.retrieval import retrieval_metrics

    x, y = _noisy_classes()
    _, matrix = fit_lmnn(x, y, seed=0)
    # how far one standard deviation of each feature moves a point in the learned space (before learning, in
    # proportion to the feature's std: the noise features, std 2, reach furthest)
    reach = np.linalg.norm(matrix, axis=1) * x.std(axis=0)
    before = x.std(axis=0)  # the identity start: the Euclidean distance, where noise outweighs the signal 1.5x
    assert (reach[1:] < reach[0]).all(), reach  # after: the signal feature reaches furthest
    assert (reach[1:] / reach[0] < 0.55 * before[1:] / before[0]).all(), (reach, before)
    test_x, test_y = _noisy_classes(seed=1)
    plain = retrieval_metrics(test_x, test_y, ks=[1], metric="euclidean")["recall_at_1"]
    learned = retrieval_metrics(test_x, test_y, ks=[1], metric="lmnn", train_features=x, train_labels=y)["recall_at_1"]
    assert learned > plain + 0.1, (plain, learned)


def test_kmeans_in_the_lmnn_space_beats_kmeans_on_the_embedding(tmp_path):
    """`cluster_space: lmnn`: k-means on digits pixels mapped by LMNN fitted on the training labels separates the
    classes better than k-means on the pixels themselves (reported next to it)."""
    from pipeline.config import EvaluateStage
    from pipeline.data import load_images
    from pipeline.evaluate import evaluate

    quiet = dict(log=lambda *_: None)
    train, evalset = load_images("digits", "train", subset=400, **quiet), load_images("digits", "test", subset=300, **quiet)
    stage = EvaluateStage.model_validate({"name": "ev", "kind": "evaluate", "input": "pixels", "knn_k": 10,
                                          "tsne": False, "html_report": False, "cluster_space": "lmnn",
                                          "kmeans_restarts": 3})
    lines: list[str] = []
    metrics, artifacts = evaluate(stage, artifact=None, train=train, evalset=evalset, out_dir=tmp_path,
                                  log=lines.append)
    assert metrics["nmi"] > metrics["embedding_kmeans_nmi"] + 0.03, metrics
    assert np.load(artifacts["cluster_space"]).shape[0] == len(evalset)
    assert any("k-means in the LMNN space (k=10): NMI" in line for line in lines), lines


def _run_lmnn_evaluate(tmp_path, root, key: str):
    """`sslpipe run` of one pixels evaluate stage with `key: lmnn` on the image folder `root`."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(f"""
        name: lmnn
        data: {{source: folder, root: {root}, load_size: 8}}
        stages: [{{name: e, kind: evaluate, input: pixels, retrieval: true, {key}: lmnn}}]
    """))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(config), "--output-dir",
                           str(tmp_path / "out")], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("key", ["retrieval_distance", "cluster_space"])
def test_lmnn_without_labels_is_exit_2(tmp_path, key):
    from PIL import Image

    for i in range(6):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    done = _run_lmnn_evaluate(tmp_path, tmp_path, key)
    assert done.returncode == 2, done.stderr
    assert f"{key} lmnn learns its" in done.stderr and "from the training split's labels" in done.stderr


@pytest.mark.parametrize("key", ["retrieval_distance", "cluster_space"])
def test_lmnn_scored_on_the_images_it_learned_from_is_exit_2(tmp_path, key):
    """A labelled folder without train/ and test/ evaluates on its training images: an LMNN map learned from their
    labels would be scored against the same labels (a leak), so the run is refused before anything trains."""
    from PIL import Image

    for c in range(2):
        (tmp_path / "imgs" / f"class_{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((12, 12, 3), 30 * i + 100 * c, dtype=np.uint8)).save(
                tmp_path / "imgs" / f"class_{c}" / f"{i}.png")
    done = _run_lmnn_evaluate(tmp_path, tmp_path / "imgs", key)
    assert done.returncode == 2, done.stderr
    assert f"{key} lmnn learns from the training split's labels" in done.stderr
    assert "the same images" in done.stderr and not (tmp_path / "out" / "stages" / "e").exists()
