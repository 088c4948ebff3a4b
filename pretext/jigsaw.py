"""Jigsaw puzzles (Noroozi & Favaro 2016): tell which permutation shuffled the tiles of an image.

Placing tiles needs to know what object parts look like and where they sit, so the backbone learns parts
and their layout without labels. Each image is upsampled (28 px images have too little to cut), split
into a grid x grid set of cells, and one tile is cut inside every cell; the tiles are shuffled by a
permutation drawn from a fixed set, and a classifier over the concatenated tile embeddings must name it.

The paper's guards against shortcuts, all batched on the training device:
  - a gap around each tile and a random offset of the tile inside its cell, so that matching edges or
    continuing lines across tile borders does not solve the puzzle;
  - each tile standardised on its own (per channel), so brightness/contrast do not give away position
    (vignetting, sky at the top);
  - per-tile random grayscale and per-tile, per-channel jitter of the standardised tile, so chromatic
    aberration (colour fringes growing towards the image border) cannot locate a tile.
The permutation set is chosen for large Hamming distances, so that the classes differ in many tile
positions and the task cannot be solved by placing one or two tiles.

One backbone embeds all tiles in one batched pass. The tiles are resized to the pipeline's input size,
because the backbone is the artifact that gets saved and evaluated at that size.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.base import Method
from pretext.settings import JigsawSettings
from pretext.transforms import LUMA_WEIGHTS, EvalTransform, to_float

# Random candidates when the full permutation group is too large to search (9! = 362880 for 3x3).
DEFAULT_POOL_SIZE = 10_000
# Floor on a tile's standard deviation: flat tiles (background) are not blown up into noise.
TILE_STD_FLOOR = 1e-2
# Seed of the puzzles drawn by `predict_accuracy`, so that held-out accuracy is repeatable.
EVAL_SEED = 1234


def permutation_set(n: int, grid_cells: int, seed: int = 0, pool_size: int = DEFAULT_POOL_SIZE) -> np.ndarray:
    """`n` permutations of `grid_cells` tiles, picked greedily to be far apart in Hamming distance.

    Starts from a random permutation, then repeatedly adds the candidate whose mean Hamming distance to
    the permutations chosen so far is largest (ties: the larger minimum distance, then the earlier
    candidate). Candidates are every permutation when there are at most `pool_size` of them (2x2: 24),
    else `pool_size` distinct random ones. Deterministic for a seed. Returns int64 (n, grid_cells).
    """
    n, cells = int(n), int(grid_cells)
    if cells < 2:
        raise ValueError(f"a puzzle needs at least 2 cells, got {cells}")
    if n < 1:
        raise ValueError(f"need at least one permutation, got n={n}")
    total = math.factorial(cells)
    if n > total:
        raise ValueError(
            f"{cells} tiles have only {total} permutations, cannot choose {n} distinct ones "
            f"(lower num_permutations to at most {total} or use a larger grid)"
        )
    rng = np.random.default_rng(seed)
    if total <= pool_size:
        pool = np.array(list(_all_permutations(cells)), dtype=np.int64)
    else:
        if n > pool_size:
            raise ValueError(f"n={n} exceeds the candidate pool of {pool_size}; raise pool_size")
        draws = rng.random((int(pool_size * 1.1) + 16, cells)).argsort(axis=1)
        pool = np.unique(draws, axis=0)  # distinct; with 9! candidates almost all draws are
        pool = pool[rng.permutation(len(pool))[:pool_size]]  # undo unique's lexicographic order
        if len(pool) < n:
            raise ValueError(f"only {len(pool)} distinct candidates for n={n}; raise pool_size")
    pool_small = pool.astype(np.int8)

    first = int(rng.integers(len(pool)))
    chosen = [first]
    taken = np.zeros(len(pool), dtype=bool)
    taken[first] = True
    dist = (pool_small != pool_small[first]).sum(axis=1)
    sum_dist, min_dist = dist.astype(np.int64), dist.astype(np.int64)
    for _ in range(n - 1):
        # Same number of chosen rows for every candidate, so the largest sum is the largest mean; the
        # minimum (at most `cells`) breaks ties exactly when folded in as the low "digit".
        key = sum_dist * (cells + 1) + min_dist
        key[taken] = -1
        pick = int(key.argmax())
        chosen.append(pick)
        taken[pick] = True
        dist = (pool_small != pool_small[pick]).sum(axis=1)
        sum_dist += dist
        np.minimum(min_dist, dist, out=min_dist)
    return pool[chosen]


def _all_permutations(cells: int):
    import itertools

    return itertools.permutations(range(cells))


def hamming_matrix(perms: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (number of positions that differ) between rows of `perms`."""
    perms = np.asarray(perms)
    return (perms[:, None, :] != perms[None, :, :]).sum(axis=2)


def cut_tiles(images: Tensor, grid: int, tile: int, offsets: Tensor, *, check: bool = True) -> Tensor:
    """Cut one `tile` x `tile` square per cell of a grid x grid split of square images.

    `images` (B, C, S, S) with S divisible by `grid`; `offsets` (B, grid*grid, 2) integer (dy, dx) of each
    tile's top-left corner inside its cell, in [0, S/grid - tile]. Returns (B, grid*grid, C, tile, tile),
    cells in raster order (row-major). Integer indexing: tiles are exact pixel copies. `check=False` skips
    the range check of the offsets (a device sync), for offsets from `Jigsaw.sample_offsets`.
    """
    b, c, h, w = images.shape
    if h != w or h % grid:
        raise ValueError(f"cut_tiles needs square images with a side divisible by {grid}, got {h}x{w}")
    cell = h // grid
    cells = grid * grid
    if offsets.shape != (b, cells, 2):
        raise ValueError(f"offsets must be ({b}, {cells}, 2), got {tuple(offsets.shape)}")
    if tile > cell or (check and bool(((offsets < 0) | (offsets > cell - tile)).any())):
        raise ValueError(f"tiles of {tile} px with these offsets do not fit in cells of {cell} px")
    dev = images.device
    k = torch.arange(cells, device=dev)
    origin = torch.stack([k // grid, k % grid], dim=1) * cell  # (cells, 2) cell corners (y, x)
    start = origin.unsqueeze(0) + offsets.to(dev, torch.long)  # (B, cells, 2)
    steps = torch.arange(tile, device=dev)
    rows = start[..., 0:1] + steps  # (B, cells, tile)
    cols = start[..., 1:2] + steps
    batch = torch.arange(b, device=dev).view(b, 1, 1, 1)
    # Advanced indices around a slice: the indexed dims come first -> (B, cells, tile, tile, C).
    out = images[batch, :, rows[..., :, None], cols[..., None, :]]
    return out.permute(0, 1, 4, 2, 3)


def assemble_tiles(tiles: Tensor, grid: int) -> Tensor:
    """Inverse of `cut_tiles` with gap 0: (B, grid*grid, C, t, t) in raster order -> (B, C, grid*t, grid*t)."""
    b, cells, c, t, _ = tiles.shape
    x = tiles.reshape(b, grid, grid, c, t, t).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid * t, grid * t)


def arrange(per_tile: Tensor, permutations: Tensor, labels: Tensor) -> Tensor:
    """Shuffle per-tile rows: position i of sample b gets tile `permutations[labels[b], i]`.

    `per_tile` (B, cells, ...) in raster order; returns the same shape in shuffled order.
    """
    perm = permutations[labels]  # (B, cells)
    index = perm.view(*perm.shape, *([1] * (per_tile.dim() - 2))).expand_as(per_tile)
    return per_tile.gather(1, index)


class Jigsaw(Method):
    name = "jigsaw"
    settings_model = JigsawSettings

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: JigsawSettings = self.settings
        self.grid = int(s.grid)
        self.cells = self.grid * self.grid
        self.cell = s.upsample_to // self.grid
        self.side = self.cell * self.grid  # upsample_to rounded down to a multiple of the grid
        self.tile = max(1, int(self.cell * (1.0 - s.gap)))
        perms = permutation_set(s.num_permutations, self.cells, seed=s.permutation_seed)
        # A buffer, so it moves with the model and is part of checkpoints (resume keeps the same classes).
        self.register_buffer("permutations", torch.from_numpy(perms))
        self.upsample = EvalTransform(self.side)
        self.head = nn.Sequential(
            nn.Linear(self.cells * self.feature_dim, s.head_hidden_dim, bias=False),
            nn.BatchNorm1d(s.head_hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(s.head_hidden_dim, s.num_permutations),
        )

    @property
    def num_permutations(self) -> int:
        return int(self.permutations.shape[0])

    # -- puzzles --------------------------------------------------------------------------------------
    def sample_offsets(self, batch: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Random (dy, dx) of every tile inside its cell, independently per sample and tile."""
        return torch.randint(
            0, self.cell - self.tile + 1, (batch, self.cells, 2), device=device, generator=generator
        )

    def extract_tiles(
        self, images: Tensor, generator: torch.Generator | None = None, *, random_offsets: bool = True
    ) -> Tensor:
        """Upsample to the puzzle size and cut the tiles (B, cells, C, tile, tile), raster order, in [0, 1].

        `random_offsets=False` cuts every tile at its cell's top-left corner (with gap 0: the cells).
        """
        x = self.upsample(to_float(images))
        b = x.shape[0]
        if random_offsets:
            offsets = self.sample_offsets(b, x.device, generator)
        else:
            offsets = torch.zeros(b, self.cells, 2, dtype=torch.long, device=x.device)
        return cut_tiles(x, self.grid, self.tile, offsets, check=False)

    def prepare_tiles(self, tiles: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, cells, C, t, t) in [0, 1] -> backbone input (B*cells, C, input_size, input_size).

        Resize to the input size, then per tile: grayscale with prob `gray_prob` (3 channels only),
        standardise each channel, and jitter each channel's scale and shift by up to +-`color_jitter`.
        The per-tile standardisation replaces the dataset normalisation (`self.normalize`), which is
        kept for evaluation: it brings whole images to a similar scale.
        """
        s: JigsawSettings = self.settings
        b, k, c, t, _ = tiles.shape
        x = tiles.reshape(b * k, c, t, t)
        if t != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                antialias=t > self.input_size,
            )
        n, dev = x.shape[0], x.device
        if c == 3 and s.gray_prob > 0.0:
            gray = torch.rand(n, device=dev, generator=generator) < s.gray_prob
            luma = (x * x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            x = torch.where(gray.view(n, 1, 1, 1), luma.expand_as(x), x)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(TILE_STD_FLOOR)
        x = (x - mean) / std
        if s.color_jitter > 0.0:
            u = torch.rand(n, c, 2, device=dev, generator=generator) * 2.0 - 1.0
            scale = 1.0 + s.color_jitter * u[..., 0]
            shift = s.color_jitter * u[..., 1]
            x = x * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)
        return x

    def make_puzzles(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Backbone-ready tiles (B*cells, C, s, s) in raster order, and a permutation label per image."""
        tiles = self.extract_tiles(images, generator)
        labels = torch.randint(0, self.num_permutations, (tiles.shape[0],), device=tiles.device, generator=generator)
        return self.prepare_tiles(tiles, generator), labels

    # -- model ----------------------------------------------------------------------------------------
    def logits(self, tiles: Tensor, labels: Tensor) -> Tensor:
        """Embed all tiles in one pass, concatenate them in the order `labels` shuffles them, classify.

        Shuffling embeddings instead of tiles is the same thing (the backbone sees each tile alone; the
        batch-norm statistics do not depend on order) and saves a copy of the images.
        """
        b = labels.shape[0]
        emb = self.backbone(tiles.contiguous(memory_format=self.memory_format))
        emb = emb.view(b, self.cells, -1)
        shuffled = arrange(emb, self.permutations, labels)
        return self.head(shuffled.reshape(b, -1)).float()

    def training_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            tiles, labels = self.make_puzzles(images)
        logits = self.logits(tiles, labels)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    @torch.no_grad()
    def predict_accuracy(self, images: Tensor | np.ndarray, batch_size: int = 256, seed: int = EVAL_SEED) -> float:
        """Held-out puzzle accuracy (eval mode), with puzzles from a fixed seed so that it is repeatable.

        `images` are uint8 or [0, 1] float (N, C, H, W) with the channels the backbone takes. The same
        augmentations as in training are applied (they are part of the task). Mode is restored afterwards.
        """
        images = torch.as_tensor(images)
        device = self.permutations.device
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            correct, total = 0, 0
            for start in range(0, len(images), batch_size):
                tiles, labels = self.make_puzzles(images[start : start + batch_size].to(device), generator)
                correct += int((self.logits(tiles, labels).argmax(dim=1) == labels).sum())
                total += int(labels.numel())
        finally:
            self.train(was_training)
        if total == 0:
            raise ValueError("predict_accuracy needs at least one image")
        return correct / total

    def heldout_report(self, images: Tensor, out_dir: Any) -> tuple[dict[str, float], dict[str, str]]:
        """Puzzle accuracy on held-out images (chance 1/num_permutations), as `heldout_pretext_accuracy`."""
        return {"pretext_accuracy": self.predict_accuracy(images)}, {}

    def artifact_extras(self) -> dict[str, Any]:
        """The permutation set defines the classes of the head; saved so the puzzles can be rebuilt."""
        return {"jigsaw_permutations": self.permutations.cpu().tolist(), "grid": self.grid}
