"""Choosing k, spherical k-means, per-cluster pages, the silhouette plot and the HTML report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clustering import choose_k, cluster_pages, html_report, kmeans, pair_f1, silhouette_plot
from clustering.report import format_value


def _blobs(k: int, per: int = 40, d: int = 8, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, d))
    y = np.repeat(np.arange(k), per)
    return (centres[y] + rng.normal(scale=spread, size=(k * per, d))).astype(np.float32), y


@pytest.mark.parametrize("true_k", [3, 5])
def test_choose_k_picks_the_true_k_on_separated_blobs(true_k):
    x, y = _blobs(true_k)
    chosen = choose_k(x, 2, 8, niter=20, seed=0)
    assert chosen.k == true_k
    assert sorted(chosen.silhouettes) == list(range(2, 9))
    assert chosen.silhouettes[true_k] == max(chosen.silhouettes.values())
    assert len(np.unique(chosen.result.assignments)) == true_k
    assert pair_f1(y, chosen.result.assignments) > 0.7  # nredo=1 may land in a local minimum


def test_choose_k_caps_the_range_and_validates():
    x, _ = _blobs(2, per=3)  # 6 points: a silhouette exists for k <= 5
    assert max(choose_k(x, 2, 50, niter=5).silhouettes) == 5
    with pytest.raises(ValueError, match="k_min"):
        choose_k(x, 1, 4)
    with pytest.raises(ValueError, match="cannot be split"):
        choose_k(x[:2], 2, 4)


def test_spherical_kmeans_centroids_are_unit_norm():
    x, _ = _blobs(4, d=5, seed=1)
    res = kmeans(x * 50.0, 4, spherical=True, seed=0)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    plain = kmeans(x * 50.0, 4, spherical=False, seed=0)
    assert np.linalg.norm(plain.centroids, axis=1).min() > 2.0  # the check above is not vacuous
    chosen = choose_k(x, 2, 6, spherical=True, niter=10)
    np.testing.assert_allclose(np.linalg.norm(chosen.result.centroids, axis=1), 1.0, atol=1e-5)


def test_kmeans_init_centroids_are_used():
    x, _ = _blobs(3, d=2, seed=2)
    start = x[[0, 40, 80]]  # one point from each blob
    res = kmeans(x, 3, niter=1, init_centroids=start)
    # one Lloyd step from one point per blob already separates the blobs, in the order of `start`
    assert res.assignments[:40].tolist() == [0] * 40 and res.assignments[80:].tolist() == [2] * 40
    with pytest.raises(ValueError, match="init_centroids"):
        kmeans(x, 3, init_centroids=start[:2])


def test_pair_f1_by_hand_with_a_split_class():
    # labels 0 0 0 0 | 1 1, clusters 0 0 1 1 | 1 1
    # same-class pairs: C(4,2)+C(2,2) = 7; same-cluster pairs: C(2,2)+C(4,2) = 7
    # both: {0,1} and {2,3} from class 0, {4,5} from class 1 -> 3
    # precision = recall = 3/7 -> F1 = 3/7
    assert pair_f1([0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]) == pytest.approx(3 / 7)


def _images(n: int, h: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 1, h, h), dtype=np.uint8)


def test_cluster_pages_one_png_per_cluster_including_empty(tmp_path):
    n = 30
    assignments = np.array([0] * 20 + [2] * 10)  # cluster 1 is empty
    distances = np.linspace(0, 1, n)
    paths = cluster_pages(_images(n), assignments, distances, tmp_path / "clusters", clusters=range(3),
                          per_page=12, columns=5, class_names=[str(i % 3) for i in range(n)])
    assert [Path(p).name for p in paths] == ["cluster_000.png", "cluster_001.png", "cluster_002.png"]
    sizes = [Image.open(p).size for p in paths]
    # 8 px images are upscaled to 64 px tiles: cluster 0 shows 12 of its 20 (3 rows of 5),
    # cluster 2 all 10 (2 rows), the empty cluster only its title
    tile_row = 64 + 4
    assert sizes[0][1] - sizes[2][1] == pytest.approx(tile_row, abs=20)
    assert sizes[1][1] < sizes[2][1]
    assert sizes[0][0] >= 5 * 64


def test_silhouette_plot_writes_png(tmp_path):
    path = silhouette_plot({2: 0.3, 3: 0.7, 4: 0.5}, 3, tmp_path / "s.png")
    assert Image.open(path).size[0] > 100


def test_html_report_links_existing_files_and_shows_values(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "pages").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "pages" / "cluster_000.png")
    (tmp_path / "m.json").write_text("{}")
    metrics = {"nmi": 0.123456, "clusters": 7.0, "odd <name>": 1.5}
    path = html_report(tmp_path / "report.html", title="t & t", metrics=metrics,
                       figures=[("a", str(tmp_path / "a.png"))],
                       pages=[("cluster 0", str(tmp_path / "pages" / "cluster_000.png"))],
                       tables={"Choosing k": (["k", "silhouette"], [[2, 0.25], [3, 0.75]])},
                       links=[("metrics", str(tmp_path / "m.json"))])
    text = Path(path).read_text()
    assert "0.1235" in text and ">7<" in text and "odd &lt;name&gt;" in text and "t &amp; t" in text
    assert "0.7500" in text
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert set(refs) == {"a.png", "pages/cluster_000.png", "m.json"}
    assert all((tmp_path / r).is_file() for r in refs)
    assert "<script" not in text and "http" not in text
    with pytest.raises(ValueError, match="outside the report folder"):
        html_report(tmp_path / "sub" / "r.html", title="x", metrics={}, figures=[("a", str(tmp_path / "a.png"))])


def test_format_value():
    assert format_value(3.0) == "3" and format_value(0.5) == "0.5000" and format_value(2) == "2"
    assert format_value(float("nan")) == "nan"


def test_cluster_figures_read_only_the_rows_they_show(tmp_path):
    """Images that live on disk (the streamed backend's array-like) are read row by row as shown: no read of
    more than one cluster's tiles, as many rows in all as tiles, and the same figures as from an ndarray."""
    from conftest import MmapImages

    from clustering import cluster_grid

    n = 500
    rng = np.random.default_rng(1)
    pixels = _images(n)
    images = MmapImages.save(tmp_path / "images.npy", pixels, max_rows=7)
    assignments = np.arange(n) % 5  # cluster 5 is empty
    distances = rng.random(n)
    names = [str(i % 3) for i in range(n)]
    grid = cluster_grid(images, assignments, distances, tmp_path / "grid.png", per_cluster=4, clusters=range(6),
                        class_names=names)
    assert images.rows_read == 5 * 4
    images.rows_read = 0
    pages = cluster_pages(images, assignments, distances, tmp_path / "pages", clusters=range(6), per_page=7,
                          class_names=names)
    assert images.rows_read == 5 * 7
    same_grid = cluster_grid(pixels, assignments, distances, tmp_path / "grid-array.png", per_cluster=4,
                             clusters=range(6), class_names=names)
    same_pages = cluster_pages(pixels, assignments, distances, tmp_path / "pages-array", clusters=range(6),
                               per_page=7, class_names=names)
    for a, b in zip([grid, *pages], [same_grid, *same_pages]):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
