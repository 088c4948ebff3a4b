"""STML: contextualized similarities and both losses equal hand-computed values, gradients stay out of the
teacher and out of g's side of the KL, the EMA rule holds, the neighbourhood sampler matches a brute-force
kNN and splits queries across ranks, and a tiny model lowers its loss on a fixed batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretext import build_method, method_settings
from pretext.stml import (
    STML,
    contextualized_similarity,
    neighbour_batch_count,
    neighbour_batches,
    pseudo_label_stats,
    rebuild_exported,
    relaxed_contrastive_loss,
    self_distillation_kl,
)

torch.set_num_threads(1)


def line(*xs: float) -> torch.Tensor:
    """Points on a line as 1-D embeddings: every distance can be read off."""
    return torch.tensor(xs, dtype=torch.float64).unsqueeze(1)


def gaussian(xs, sigma: float) -> torch.Tensor:
    x = torch.tensor(xs, dtype=torch.float64)
    return torch.exp(-((x[:, None] - x[None, :]) ** 2) / sigma)


def indicator(sets: list[set[int]], n: int) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, s in enumerate(sets):
        m[i, sorted(s)] = True
    return m


# -- contextualized similarity --------------------------------------------------------------------

def test_contextualized_similarity_by_hand_one_view():
    # x = 0, 1, 3, 7, 12, 20; k' = 3 * 1 = 3 nearest, the point itself included.
    xs = [0.0, 1.0, 3.0, 7.0, 12.0, 20.0]
    sigma = 50.0
    W, parts = contextualized_similarity(line(*xs), k=3, views=1, sigma=sigma, return_parts=True)
    # kNN, ranked: 0:[0,1,2] 1:[1,0,2] 2:[2,1,0] 3:[3,2,4] (d=4 < d=5) 4:[4,3,5] (5 < 8) 5:[5,4,3]
    assert parts["knn"].tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 2, 4], [4, 3, 5], [5, 4, 3]]
    # k-reciprocal: R(0)=R(1)=R(2)={0,1,2}; R(3)={3,4} (3 not in kNN(2)); R(4)={3,4,5}; R(5)={4,5}
    R = [{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {3, 4}, {3, 4, 5}, {4, 5}]
    assert torch.equal(parts["reciprocal"].cpu(), indicator(R, 6))
    # W~(i, j) = |R(i) & R(j)| / |R(i)| on j in R(i)
    third = 1.0 / 3.0
    w_tilde = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],                      # |{3,4}&{3,4}|/2, |{3,4}&{3,4,5}|/2
        [0, 0, 0, 2 * third, 1, 2 * third],      # |{3,4,5}&{3,4}|/3, 1, |{3,4,5}&{4,5}|/3
        [0, 0, 0, 0, 1, 1],                      # |{4,5}&{3,4,5}|/2, 1
    ], dtype=torch.float64)
    assert torch.allclose(parts["W_tilde"].double(), w_tilde, atol=1e-6)
    # Query expansion over round(3/2) = 2 nearest: 0:{0,1} 1:{1,0} 2:{2,1} 3:{3,2} 4:{4,3} 5:{5,4}
    w_hat = torch.stack([
        (w_tilde[0] + w_tilde[1]) / 2,
        (w_tilde[1] + w_tilde[0]) / 2,
        (w_tilde[2] + w_tilde[1]) / 2,
        (w_tilde[3] + w_tilde[2]) / 2,
        (w_tilde[4] + w_tilde[3]) / 2,
        (w_tilde[5] + w_tilde[4]) / 2,
    ])
    # written out: rows 0-2 = [1,1,1,0,0,0], row 3 = [.5,.5,.5,.5,.5,0], row 4 = [0,0,0,5/6,1,1/3], ...
    assert torch.allclose(w_hat[3], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(w_hat[4], torch.tensor([0, 0, 0, 5 / 6, 1, 1 / 3], dtype=torch.float64))
    assert torch.allclose(w_hat[5], torch.tensor([0, 0, 0, 1 / 3, 1, 5 / 6], dtype=torch.float64))
    assert torch.allclose(parts["W_hat"].double(), w_hat, atol=1e-6)
    w_c = (w_hat + w_hat.T) / 2
    assert torch.allclose(parts["W_C"].double(), w_c, atol=1e-6)
    assert torch.allclose(W.double(), (gaussian(xs, sigma) + w_c) / 2, atol=1e-6)


def test_contextualized_similarity_by_hand_two_views():
    # 3 images (A, B, C) x 2 views, view-major rows: 0=A0, 1=B0, 2=C0, 3=A1, 4=B1, 5=C1.
    xs = [0.0, 2.0, 10.0, 1.0, 5.0, 7.0]
    sigma = 30.0
    W, parts = contextualized_similarity(line(*xs), k=2, views=2, sigma=sigma, return_parts=True)
    # k' = 4: self, then the other view (forced), then the two nearest other points.
    #   A0(0): B0 d2, B1 d5          B0(2): A1 d1, A0 d2        C0(10): B1 d5, B0 d8
    #   A1(1): B0 d1, B1 d4          B1(5): C1 d2, A1 d4        C1(7):  B1 d2, B0 d5
    assert parts["knn"].tolist() == [[0, 3, 1, 4], [1, 4, 3, 0], [2, 5, 4, 1],
                                     [3, 0, 1, 4], [4, 1, 5, 3], [5, 2, 4, 1]]
    # R(0)={0,1,3} (0 not in kNN(4)); R(1)=R(3)={0,1,3,4}; R(2)={2,5}; R(4)={1,3,4,5}; R(5)={2,4,5}
    R = [{0, 1, 3}, {0, 1, 3, 4}, {2, 5}, {0, 1, 3, 4}, {1, 3, 4, 5}, {2, 4, 5}]
    assert torch.equal(parts["reciprocal"].cpu(), indicator(R, 6))
    w_tilde = torch.tensor([
        [1, 1, 0, 1, 0, 0],                 # R(0) is inside R(1) and R(3)
        [3 / 4, 1, 0, 1, 3 / 4, 0],         # |R1&R0|=3, |R1&R4|=|{1,3,4}|=3, over |R1|=4
        [0, 0, 1, 0, 0, 1],                 # |{2,5}&{2,4,5}|/2 = 1
        [3 / 4, 1, 0, 1, 3 / 4, 0],         # R(3) = R(1)
        [0, 3 / 4, 0, 3 / 4, 1, 2 / 4],     # |R4&R5| = |{4,5}| = 2
        [0, 0, 2 / 3, 0, 2 / 3, 1],         # |R5&R2| = 2, |R5&R4| = 2, over 3
    ], dtype=torch.float64)
    assert torch.allclose(parts["W_tilde"].double(), w_tilde, atol=1e-6)
    # round(4/2) = 2 nearest = self and the other view: the two views of an image share a row.
    w_hat = torch.tensor([
        [7 / 8, 1, 0, 1, 3 / 8, 0],
        [3 / 8, 7 / 8, 0, 7 / 8, 7 / 8, 1 / 4],
        [0, 0, 5 / 6, 0, 1 / 3, 1],
        [7 / 8, 1, 0, 1, 3 / 8, 0],
        [3 / 8, 7 / 8, 0, 7 / 8, 7 / 8, 1 / 4],
        [0, 0, 5 / 6, 0, 1 / 3, 1],
    ], dtype=torch.float64)
    assert torch.allclose(parts["W_hat"].double(), w_hat, atol=1e-6)
    w_c = (w_hat + w_hat.T) / 2
    assert torch.allclose(parts["W_C"].double(), w_c, atol=1e-6)
    # The forced ranking does not leak into W: W_P keeps the real affinity of A0 and A1.
    assert torch.allclose(parts["W_P"].double(), gaussian(xs, sigma), atol=1e-6)
    assert torch.allclose(W.double(), (gaussian(xs, sigma) + w_c) / 2, atol=1e-6)


def test_views_of_an_image_are_forced_neighbours():
    # A0=0 is nearer B0=1 than its own second view A1=5; with k=1, views=2 the k'=2 set is {self, other view}.
    xs = [0.0, 1.0, 10.0, 5.0, 11.0, 4.0]
    sigma = 10.0
    W, parts = contextualized_similarity(line(*xs), k=1, views=2, sigma=sigma, return_parts=True)
    assert parts["knn"].tolist() == [[0, 3], [1, 4], [2, 5], [3, 0], [4, 1], [5, 2]]
    same = torch.tensor([[i % 3 == j % 3 for j in range(6)] for i in range(6)], dtype=torch.float64)
    assert torch.equal(parts["reciprocal"].cpu(), same.bool())
    # R(i) = {i, other view}: W~ = W^ = W_C = the same-image indicator (expansion over round(2/2)=1: self).
    assert torch.allclose(parts["W_C"].double(), same)
    assert torch.allclose(W.double(), (gaussian(xs, sigma) + same) / 2, atol=1e-6)
    assert W[0, 3].item() == pytest.approx((math.exp(-25 / sigma) + 1) / 2, abs=1e-6)


def test_contextualized_similarity_properties_random():
    torch.manual_seed(0)
    views, images = 3, 8
    t = torch.nn.functional.normalize(torch.randn(views * images, 5), dim=1)
    W, parts = contextualized_similarity(t, k=2, views=views, sigma=3.0, return_parts=True)
    assert torch.allclose(W, W.T, atol=1e-6)
    assert float(W.min()) >= 0.0 and float(W.max()) <= 1.0 + 1e-6
    for i in range(views * images):
        same = {(i % images) + v * images for v in range(views)}
        assert same <= set(parts["knn"][i].tolist())
        assert parts["knn"][i, 0].item() == i
        assert parts["reciprocal"][i, i]


# -- losses ---------------------------------------------------------------------------------------

EMB_F = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # distances 3, 4, 5


def test_relaxed_contrastive_loss_by_hand():
    W = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.5], [0.2, 0.5, 1.0]], dtype=torch.float64)
    delta = 1.5
    # Row means over all 3 entries (zero diagonal included): 7/3, 8/3, 3.
    d = {(0, 1): 9 / 7, (0, 2): 12 / 7, (1, 0): 9 / 8, (1, 2): 15 / 8, (2, 0): 4 / 3, (2, 1): 5 / 3}
    total = 0.0
    for (i, j), dij in d.items():
        w = W[i, j].item()
        total += w * dij**2 + (1 - w) * max(0.0, delta - dij) ** 2
    expected = total / 6  # 6 off-diagonal pairs
    got = relaxed_contrastive_loss(EMB_F, W, delta)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Scale invariance: the row-mean normalization removes the embedding's scale.
    assert relaxed_contrastive_loss(7.0 * EMB_F, W, delta).item() == pytest.approx(expected, rel=1e-12)


def reference_relaxed_loss(emb, W, delta: float) -> float:
    """The loss from its definition, in plain Python loops (independent of pretext.stml): Euclidean distances
    divided by their row mean over all n entries (zero diagonal included), then the mean over i != j of
    W_ij d_ij^2 + (1 - W_ij) max(0, delta - d_ij)^2."""
    e, w = emb.tolist(), W.tolist()
    n = len(e)
    dist = [[math.dist(e[i], e[j]) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        mean = sum(dist[i]) / n
        for j in range(n):
            if i != j:
                d = dist[i][j] / mean
                total += w[i][j] * d**2 + (1 - w[i][j]) * max(0.0, delta - d) ** 2
    return total / (n * (n - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relaxed_contrastive_loss_matches_its_definition_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(7, 4, generator=g, dtype=torch.float64)
    W = torch.rand(7, 7, generator=g, dtype=torch.float64)
    W = (W + W.T) / 2
    W.fill_diagonal_(1.0)
    for delta in (0.5, 1.0, 1.5):
        assert relaxed_contrastive_loss(emb, W, delta).item() == pytest.approx(reference_relaxed_loss(emb, W, delta),
                                                                               rel=1e-10)


def test_self_distillation_kl_by_hand():
    emb_g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # distances 1, 1, sqrt 2
    r2 = math.sqrt(2.0)
    dg = [[0, 3 / 2, 3 / 2], [3 / (1 + r2), 0, 3 * r2 / (1 + r2)], [3 / (1 + r2), 3 * r2 / (1 + r2), 0]]
    df = [[0, 9 / 7, 12 / 7], [9 / 8, 0, 15 / 8], [4 / 3, 5 / 3, 0]]

    def softmax(row):
        e = [math.exp(-v) for v in row]
        return [v / sum(e) for v in e]

    expected = sum(
        sum(p * math.log(p / q) for p, q in zip(softmax(g), softmax(f))) for g, f in zip(dg, df)
    ) / 3
    got = self_distillation_kl(EMB_F, emb_g)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert self_distillation_kl(emb_g, emb_g).item() == pytest.approx(0.0, abs=1e-12)
    # float32 (the training dtype) agrees to float32 precision
    assert self_distillation_kl(EMB_F.float(), emb_g.float()).item() == pytest.approx(expected, abs=1e-7)


# -- the method -----------------------------------------------------------------------------------

class TinyNet(nn.Module):
    """A conv + BN net with a timm-like forward_features (B, 8, h, w): enough for STML's pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.num_features = 8

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class FixedViews(nn.Module):
    """Deterministic stand-in for the augmentation: view 0 is the image, view 1 its mirror."""

    def forward(self, x):
        half = x.shape[0] // 2
        return torch.cat([x[:half], x[half:].flip(-1)], dim=0)


def tiny_stml(**settings) -> STML:
    settings = {"embedding_dim": 4, "big_embedding_dim": 12, "num_neighbors": 2, **settings}
    return build_method("stml", TinyNet(), 8, settings, input_size=12)


def test_registry_settings_and_embedder():
    model = tiny_stml()
    assert isinstance(model, STML)
    s = method_settings("stml")()
    assert (s.momentum, s.sigma, s.delta, s.num_neighbors, s.views) == (0.999, 3.0, 1.0, 5, 2)
    assert (s.embedding_dim, s.big_embedding_dim) == (128, 1024)
    # Overriding one augmentation key keeps STML's other defaults (no colour jitter).
    s2 = method_settings("stml").model_validate({"augment": {"min_scale": 0.3}})
    assert s2.augment.min_scale == 0.3 and s2.augment.cj_prob == 0.0
    with pytest.raises(ValueError):
        method_settings("stml").model_validate({"sigmaa": 1.0})
    with pytest.raises(ValueError):
        method_settings("stml").model_validate({"sigma": 0.0})
    with pytest.raises(ValueError):
        method_settings("stml").model_validate({"rc_weight": 0.0, "kl_weight": 0.0})

    embedder = model.embedder()
    z = embedder(torch.rand(5, 3, 12, 12))
    assert z.shape == (5, 4) and embedder.num_features == 4
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    assert not embedder.training and model.training
    with torch.no_grad():  # an independent copy: later training does not change the export
        model.f.weight.add_(1.0)
    assert not torch.equal(embedder.head.weight, model.f.weight)


def test_pseudo_label_stats_by_hand_and_from_a_training_step():
    # Three points, k' = 2: 0 and 1 are mutual neighbours, 2's nearest are itself and 1, but 1 does not rank 2.
    W = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
    parts = {"knn": torch.tensor([[0, 1], [1, 0], [2, 1]]),
             "reciprocal": torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)}
    stats = pseudo_label_stats(W, parts)
    off = torch.tensor([0.8, 0.2, 0.8, 0.4, 0.2, 0.4])
    assert stats["pseudo_label_mean"].item() == pytest.approx(off.mean().item())
    assert stats["pseudo_label_std"].item() == pytest.approx(off.std().item())
    assert stats["reciprocal_fraction"].item() == pytest.approx((2 / 2 + 2 / 2 + 1 / 2) / 3)

    # A training step reports the statistics of the very labels its loss used.
    torch.manual_seed(0)
    model = tiny_stml()
    model.augment = FixedViews()
    images = torch.rand(6, 3, 12, 12)
    out = model(images)
    s = model.settings
    W, parts = contextualized_similarity(model.teacher_embed(model.make_views(images)), s.num_neighbors, model.views,
                                         s.sigma, return_parts=True)
    for key, value in pseudo_label_stats(W, parts).items():
        assert out[key].item() == pytest.approx(value.item(), abs=1e-6), key
    assert 0.0 < out["pseudo_label_std"].item() and 0.0 < out["reciprocal_fraction"].item() <= 1.0


def test_no_gradient_into_teacher_or_g_through_kl():
    torch.manual_seed(0)
    model = tiny_stml()
    model.augment = FixedViews()
    out = model(torch.rand(6, 3, 12, 12))
    assert set(out) == {"loss", "loss_rc", "loss_kl", "pseudo_label_mean", "pseudo_label_std", "reciprocal_fraction"}
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher_backbone.parameters())
    assert all(p.grad is None for p in model.teacher_g.parameters())
    assert model.f.weight.grad.abs().sum() > 0 and model.g.weight.grad.abs().sum() > 0

    # The KL alone: f and the backbone learn, g gets nothing.
    model.zero_grad(set_to_none=True)
    x = model.make_views(torch.rand(6, 3, 12, 12))
    emb_f, emb_g = model.student_embed(x)
    self_distillation_kl(emb_f, emb_g).backward()
    assert model.g.weight.grad is None and model.g.bias.grad is None
    assert model.f.weight.grad.abs().sum() > 0

    # Through training_step with the contrastive term weighted 0: g's gradient is exactly zero.
    model = tiny_stml(rc_weight=0.0)
    model.augment = FixedViews()
    model(torch.rand(6, 3, 12, 12))["loss"].backward()
    assert model.g.weight.grad is None or float(model.g.weight.grad.abs().sum()) == 0.0


def test_teacher_follows_the_ema_rule_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = tiny_stml(momentum=0.9)
    model.train()
    assert not model.teacher_backbone.training and not model.teacher_g.training
    model.augment = FixedViews()
    model(torch.rand(6, 3, 12, 12))  # moves the student's BN statistics
    with torch.no_grad():
        for p in list(model.backbone.parameters()) + list(model.g.parameters()):
            p.add_(torch.randn_like(p))
    teacher_before = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    teacher_g_before = {k: v.clone() for k, v in model.teacher_g.state_dict().items()}
    student = model.backbone.state_dict()
    model.after_optimizer_step(0.5)
    for key, value in model.teacher_backbone.state_dict().items():
        if value.dtype.is_floating_point:
            assert torch.allclose(value, 0.9 * teacher_before[key] + 0.1 * student[key], atol=1e-6), key
        else:  # num_batches_tracked is copied
            assert torch.equal(value, student[key])
    for key, value in model.teacher_g.state_dict().items():
        assert torch.allclose(value, 0.9 * teacher_g_before[key] + 0.1 * model.g.state_dict()[key], atol=1e-6)


@pytest.mark.parametrize("bn_freeze", [False, True])
def test_bn_freeze_keeps_the_student_batchnorm_as_loaded(bn_freeze):
    torch.manual_seed(0)
    model = tiny_stml(bn_freeze=bn_freeze)
    norm = model.backbone.body[1]
    conv = model.backbone.body[0]
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    conv_before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD([p for g in model.parameter_groups(0.0) for p in g["params"]], lr=0.1)
    model.train()
    model.augment = FixedViews()
    for _ in range(2):
        loss = model(torch.rand(6, 3, 12, 12))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(0.5)
    # Sampling each epoch switches the method to eval and back; the frozen layers must stay frozen.
    model.epoch_batches(np.random.randint(0, 255, (8, 3, 12, 12), dtype=np.uint8), epoch=0, rank=0, world_size=1,
                        batch_size=4, seed=0)
    assert model.training and norm.training is not bn_freeze
    assert not torch.equal(conv.weight, conv_before)  # the rest of the backbone trains either way
    moved = [k for k, v in norm.state_dict().items() if not torch.equal(v, before[k])]
    if bn_freeze:
        assert moved == []
        assert not any(p.requires_grad for p in norm.parameters())
    else:
        assert {"weight", "bias", "running_mean", "running_var"} <= set(moved)


def test_loss_drops_with_fixed_teacher():
    from pipeline.backbones import build_backbone

    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("test_resnet", small_image_stem=False)
    model = build_method("stml", backbone, feature_dim,
                         {"embedding_dim": 16, "big_embedding_dim": 32, "num_neighbors": 2}, input_size=32)
    model.augment = FixedViews()
    teacher = {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()}
    images = torch.rand(8, 3, 32, 32)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, teacher[k]) for k, v in model.teacher_backbone.state_dict().items())


# -- neighbourhood batches ------------------------------------------------------------------------

def expected_batch(sim: np.ndarray, queries, num_neighbors: int, batch_size: int) -> list[int]:
    """The batch the sampler should build, from a brute-force similarity matrix."""
    placed: list[int] = []
    for q in queries:
        size = min(num_neighbors, batch_size - len(placed))
        if size <= 0:
            break
        group = [] if q in placed else [q]
        ranked = [j for j in np.argsort(-sim[q], kind="stable") if j != q and j not in placed]
        group += ranked[: size - len(group)]
        placed += group
    return placed


def test_neighbour_batches_are_queries_with_their_nearest_neighbours():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(42, 6)).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    nn_, bs = 4, 10  # 3 groups a batch: 4 + 4 + 2
    batches, queries = neighbour_batches(emb, num_neighbors=nn_, batch_size=bs, seed=3, epoch=0,
                                         return_queries=True)
    assert len(batches) == neighbour_batch_count(42, num_neighbors=nn_, batch_size=bs) == 14
    assert sorted(np.concatenate(queries).tolist()) == list(range(42))  # every image a query once
    for batch, qs in zip(batches, queries):
        assert len(batch) == bs and len(set(batch.tolist())) == bs
        assert batch.tolist() == expected_batch(sim, qs.tolist(), nn_, bs)
        # The first group is its query and the query's 3 nearest neighbours (nothing placed before it).
        nearest = [j for j in np.argsort(-sim[qs[0]]) if j != qs[0]][:3]
        assert batch[0] == qs[0] and set(batch[1:4].tolist()) == set(nearest)


def test_neighbour_batches_split_queries_across_ranks_and_are_seeded():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(41, 5)).astype(np.float32)
    kwargs = dict(num_neighbors=3, batch_size=6, seed=7)
    per_rank = [neighbour_batches(emb, epoch=2, rank=r, world_size=2, return_queries=True, **kwargs) for r in (0, 1)]
    count = neighbour_batch_count(41, num_neighbors=3, batch_size=6, world_size=2)
    assert [len(b) for b, _ in per_rank] == [count, count] == [11, 11]  # 21 queries / 2 a batch; rank 1 pads
    q0 = set(np.concatenate(per_rank[0][1]).tolist())
    q1 = set(np.concatenate(per_rank[1][1]).tolist())
    assert not q0 & q1 and q0 | q1 == set(range(41))
    for batches, _ in per_rank:
        assert all(len(b) == 6 and len(set(b.tolist())) == 6 for b in batches)

    again = neighbour_batches(emb, epoch=2, rank=0, world_size=2, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(again, per_rank[0][0]))
    other_epoch = neighbour_batches(emb, epoch=3, rank=0, world_size=2, **kwargs)
    assert any(not np.array_equal(a, b) for a, b in zip(other_epoch, per_rank[0][0]))
    with pytest.raises(ValueError):
        neighbour_batches(emb, num_neighbors=3, batch_size=42, seed=0, epoch=0)


# -- pipeline hooks -------------------------------------------------------------------------------

def test_epoch_batches_match_the_default_step_count():
    torch.manual_seed(0)
    model = tiny_stml(num_neighbors=3)
    images = (np.random.default_rng(0).random((26, 1, 10, 10)) * 255).astype(np.uint8)  # grayscale data
    per_rank = [model.epoch_batches(images, epoch=1, rank=r, world_size=2, batch_size=5, seed=4) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]  # (26 // 2) // 5, as the default sampler
    for batches in per_rank:
        assert all(len(b) == 5 and len(set(b.tolist())) == 5 and b.max() < 26 for b in batches)
    assert model.training and not model.teacher_backbone.training  # modes restored after embedding


def test_export_module_round_trips():
    torch.manual_seed(0)
    model = tiny_stml()
    module, meta = model.export_module()
    assert meta["export"] == "stml_embedder" and meta["embedding_dim"] == 4
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert {k.split(".")[0] for k in state} == {"backbone", "head"}
    rebuilt = rebuild_exported(TinyNet(), {**meta, "feature_dim": 8})
    rebuilt.load_state_dict(state, strict=True)
    x = torch.rand(3, 3, 12, 12)
    model.eval()
    assert torch.allclose(rebuilt.eval()(x), model.embedder(normalize=False)(x), atol=1e-6)
    # f is exported as trained (unnormalized) unless normalize_embedding is set
    assert meta["l2_normalize"] is False and not torch.allclose(rebuilt(x).norm(dim=1), torch.ones(3))
    module, meta = tiny_stml(normalize_embedding=True).export_module()
    assert meta["l2_normalize"] is True and torch.allclose(module.eval()(x).norm(dim=1), torch.ones(3), atol=1e-5)


def test_average_pooling_option_reaches_training_and_the_exported_embedder():
    torch.manual_seed(0)
    model = tiny_stml(pooling="gap")
    x = torch.rand(3, 3, 12, 12)
    model.eval()
    maps = model.backbone.forward_features(x)
    f, g = model.student_embed(x)
    assert torch.allclose(f, model.f(maps.mean(dim=(2, 3))), atol=1e-6)
    assert torch.allclose(model.teacher_embed(x), torch.nn.functional.normalize(model.teacher_g(
        model.teacher_backbone.forward_features(x).mean(dim=(2, 3))), dim=1), atol=1e-6)
    module, meta = model.export_module()
    assert meta["pooling"] == "gap"
    state = {k: v.clone() for k, v in module.state_dict().items()}
    rebuilt = rebuild_exported(TinyNet(), {**meta, "feature_dim": 8})
    rebuilt.load_state_dict(state, strict=True)
    assert torch.allclose(rebuilt.eval()(x), f, atol=1e-6)
    # The authors' pooling (the default) adds the max: a different embedding from the same weights.
    authors = rebuild_exported(TinyNet(), {**meta, "feature_dim": 8, "pooling": "gap+gmp"})
    authors.load_state_dict(state, strict=True)
    assert not torch.allclose(authors.eval()(x), f, atol=1e-3)
    with pytest.raises(ValueError, match="pooling"):
        method_settings("stml").model_validate({"pooling": "max"})
    with pytest.raises(ValueError, match="pooling"):
        rebuild_exported(TinyNet(), {**meta, "feature_dim": 8, "pooling": "max"})
