"""Jigsaw: permutation sets, exact tile geometry, shortcut guards, registry, artifact, and that it learns.

The learning test trains a tiny timm ResNet ("test_resnet") on 2x2 puzzles of a Fashion-MNIST subset
and checks puzzle accuracy on held-out (test split) images against chance (1/num_permutations).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import require_fashion_mnist
from pipeline.backbones import build_backbone, load_backbone, save_backbone
from pretext import build_method
from pretext.jigsaw import Jigsaw, arrange, assemble_tiles, cut_tiles, hamming_matrix, permutation_set

BACKBONE = "test_resnet"  # tiny ResNet shipped with timm for tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _method(input_size=16, **settings) -> Jigsaw:
    torch.manual_seed(0)
    backbone, dim = build_backbone(BACKBONE)
    settings = {"grid": 2, "num_permutations": 24, "upsample_to": 32, "head_hidden_dim": 64, **settings}
    return build_method("jigsaw", backbone, dim, settings, input_size=input_size)


def _pairwise(perms: np.ndarray) -> np.ndarray:
    h = hamming_matrix(perms)
    return h[np.triu_indices(len(perms), 1)]


# -- permutation sets ---------------------------------------------------------------------------------------
def test_permutation_set_is_deterministic_valid_and_unique():
    a = permutation_set(100, 9, seed=3)
    assert a.shape == (100, 9) and a.dtype == np.int64
    assert np.array_equal(a, permutation_set(100, 9, seed=3))
    assert not np.array_equal(a, permutation_set(100, 9, seed=4))
    assert (np.sort(a, axis=1) == np.arange(9)).all()  # every row is a permutation of 0..8
    assert len(np.unique(a, axis=0)) == 100
    full = permutation_set(24, 4, seed=0)  # 2x2: the whole group
    assert len(np.unique(full, axis=0)) == 24 and (np.sort(full, axis=1) == np.arange(4)).all()


def test_greedy_set_is_farther_apart_than_a_random_one():
    for n, cells in ((100, 9), (300, 9), (10, 4)):
        greedy = permutation_set(n, cells, seed=0)
        rng = np.random.default_rng(0)
        if cells == 4:
            pool = np.array(sorted({tuple(rng.permutation(4)) for _ in range(1000)}))
            random = pool[rng.choice(len(pool), n, replace=False)]
        else:
            distinct = np.unique(rng.random((n * 2, cells)).argsort(axis=1), axis=0)
            random = distinct[rng.permutation(len(distinct))[:n]]  # shuffled: unique() sorts rows
        assert len(np.unique(random, axis=0)) == n
        g, r = _pairwise(greedy), _pairwise(random)
        assert g.min() >= r.min(), (n, cells, g.min(), r.min())
        assert g.mean() > r.mean(), (n, cells, g.mean(), r.mean())


def test_first_pick_is_the_candidate_farthest_on_average():
    """The greedy rule itself, checked against a brute-force recomputation on the 2x2 group."""
    perms = permutation_set(6, 4, seed=1)
    group = np.array(list(itertools.permutations(range(4))))
    for k in range(1, 6):
        chosen = perms[:k]
        rest = [p for p in group if not any((p == c).all() for c in chosen)]
        d = np.array([[(p != c).sum() for c in chosen] for p in rest])
        best = max(zip(d.mean(axis=1), d.min(axis=1)))
        got = (perms[k] != chosen).sum(axis=1)
        assert (got.mean(), got.min()) == best


def test_too_many_permutations_for_a_2x2_grid():
    with pytest.raises(ValueError, match="only 24 permutations"):
        permutation_set(25, 4)
    with pytest.raises(ValueError, match="only 24 permutations"):
        _method(num_permutations=30)
    with pytest.raises(ValueError):
        permutation_set(0, 9)


def test_large_set_is_fast():
    import time

    start = time.perf_counter()
    perms = permutation_set(1000, 9, seed=0)
    assert perms.shape == (1000, 9) and len(np.unique(perms, axis=0)) == 1000
    assert time.perf_counter() - start < 20.0  # ~1 s on one busy core; generous for shared machines


# -- geometry -----------------------------------------------------------------------------------------------
def test_tiles_without_gap_reassemble_to_the_upsampled_image():
    method = _method(gap=0.0, grid=3, num_permutations=10, upsample_to=48)
    assert (method.cell, method.tile, method.side) == (16, 16, 48)
    images = torch.rand(2, 3, 28, 28)
    tiles = method.extract_tiles(images, random_offsets=False)
    assert tiles.shape == (2, 9, 3, 16, 16)
    assert torch.equal(assemble_tiles(tiles, 3), method.upsample(images))
    # With gap 0 there is no room to move, so random offsets give the same tiles.
    assert torch.equal(method.extract_tiles(images), tiles)


def test_tiles_with_gap_are_exact_crops_inside_their_cells():
    x = torch.arange(2 * 1 * 12 * 12, dtype=torch.float32).view(2, 1, 12, 12)
    offsets = torch.tensor([[[0, 0], [2, 1], [1, 2], [2, 2]], [[1, 0], [0, 2], [2, 0], [0, 1]]])
    tiles = cut_tiles(x, grid=2, tile=4, offsets=offsets)  # cells of 6 px, tiles of 4 px
    assert tiles.shape == (2, 4, 1, 4, 4)
    for b in range(2):
        for k in range(4):
            y0, x0 = (k // 2) * 6 + int(offsets[b, k, 0]), (k % 2) * 6 + int(offsets[b, k, 1])
            assert torch.equal(tiles[b, k], x[b, :, y0 : y0 + 4, x0 : x0 + 4])
    with pytest.raises(ValueError, match="do not fit"):
        cut_tiles(x, grid=2, tile=4, offsets=offsets + 1)


def test_random_offsets_stay_inside_cells_and_differ_per_tile():
    method = _method(gap=0.25)  # cells 16, tiles 12
    assert (method.cell, method.tile) == (16, 12)
    offsets = method.sample_offsets(64, "cpu", torch.Generator().manual_seed(0))
    assert offsets.min() >= 0 and offsets.max() <= 4
    assert len(torch.unique(offsets.view(-1, 2), dim=0)) > 10  # per sample and per tile, not shared


def test_arrange_puts_tile_perm_i_at_position_i():
    perms = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    per_tile = torch.arange(2 * 4 * 2).view(2, 4, 2)
    labels = torch.tensor([2, 1])
    out = arrange(per_tile, perms, labels)
    for b in range(2):
        for i in range(4):
            assert torch.equal(out[b, i], per_tile[b, perms[labels[b], i]])


def test_tiles_are_standardised_and_guarded_against_colour_shortcuts():
    plain = _method(color_jitter=0.0, gray_prob=0.0, input_size=12, gap=0.25)
    images = torch.rand(3, 3, 28, 28) * torch.tensor([1.0, 0.5, 0.2]).view(1, 3, 1, 1)
    tiles = plain.prepare_tiles(plain.extract_tiles(images))
    assert tiles.shape == (12, 3, 12, 12)  # B*cells tiles at the input size
    assert torch.allclose(tiles.mean(dim=(2, 3)), torch.zeros(12, 3), atol=1e-5)
    assert torch.allclose(tiles.std(dim=(2, 3), unbiased=False), torch.ones(12, 3), atol=1e-4)

    gray = _method(color_jitter=0.0, gray_prob=1.0)
    tiles = gray.prepare_tiles(gray.extract_tiles(images))
    assert torch.allclose(tiles[:, 0], tiles[:, 1], atol=1e-5) and torch.allclose(tiles[:, 1], tiles[:, 2], atol=1e-5)

    jitter = _method(color_jitter=0.5, gray_prob=0.0)
    tiles = jitter.prepare_tiles(jitter.extract_tiles(images), torch.Generator().manual_seed(0))
    means = tiles.mean(dim=(2, 3))
    assert means.abs().max() > 0.05 and means.abs().max() <= 0.5 + 1e-5  # shifted, within strength
    assert not torch.allclose(means[:, 0], means[:, 1])  # per channel


# -- the method ---------------------------------------------------------------------------------------------
def test_registry_training_step_and_artifact_extras():
    method = _method()
    assert isinstance(method, Jigsaw)
    assert method.permutations.shape == (24, 4) and method.head[-1].out_features == 24
    out = method(torch.rand(4, 3, 28, 28))
    assert set(out) == {"loss", "accuracy"} and torch.isfinite(out["loss"])
    assert not out["accuracy"].requires_grad
    assert abs(float(out["loss"].detach()) - math.log(24)) < 1.5  # untrained: near chance
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    extras = method.artifact_extras()
    assert extras["grid"] == 2
    assert extras["jigsaw_permutations"] == permutation_set(24, 4, seed=0).tolist()
    json.dumps(extras)  # stored in backbone.json
    assert torch.equal(method.state_dict()["permutations"], method.permutations)  # kept in checkpoints


def test_grayscale_backbone_input():
    torch.manual_seed(0)
    backbone, dim = build_backbone(BACKBONE, in_chans=1)
    method = build_method("jigsaw", backbone, dim, {"grid": 2, "num_permutations": 5, "upsample_to": 32,
                                                    "head_hidden_dim": 16}, input_size=16, mean=[0.5], std=[0.5])
    assert torch.isfinite(method(torch.rand(2, 1, 28, 28))["loss"])


def test_learns_2x2_puzzles_of_held_out_fashion_mnist(tmp_path):
    require_fashion_mnist()
    from pipeline.data import load_images

    train = load_images("fashion-mnist", "train", subset=2000, seed=0, log=lambda _: None)
    test = load_images("fashion-mnist", "test", subset=300, seed=0, log=lambda _: None)
    method = _method(input_size=16)  # 28 px -> 32 px, cells of 16, tiles of 13 resized to 16
    chance = 1.0 / method.num_permutations
    images = torch.from_numpy(train.images)
    held_out = torch.from_numpy(test.images).expand(-1, 3, -1, -1)

    steps = 80
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(0)
    method.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (32,), generator=generator)
        loss = method(images[idx].float().div(255.0).expand(-1, 3, -1, -1))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    accuracy = method.predict_accuracy(held_out)
    print(f"held-out 2x2 jigsaw accuracy after {steps} steps: {accuracy:.3f} (chance {chance:.3f})")
    assert method.training
    assert accuracy > 0.3, f"held-out jigsaw accuracy {accuracy:.3f} (chance {chance:.3f})"
    few = held_out[:64]
    expected = method.predict_accuracy(few)
    assert method.predict_accuracy(few) == expected  # fixed puzzle seed: repeatable
    assert method.heldout_report(few.float() / 255.0, tmp_path) == ({"pretext_accuracy": expected}, {})

    backbone = method.backbone.eval()
    path = save_backbone(tmp_path / "bb", backbone, name=BACKBONE, small_image_stem=False, in_chans=3, kwargs={},
                         feature_dim=method.feature_dim, input_size=16, mean=[0.5] * 3, std=[0.5] * 3,
                         provenance={"extras": method.artifact_extras()})
    loaded = load_backbone(path)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded(x))
    meta = json.loads((path / "backbone.json").read_text())
    assert meta["extras"]["jigsaw_permutations"] == method.permutations.tolist()
