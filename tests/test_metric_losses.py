"""Metric learning losses: quadruplet formula, Embedding Expansion, every loss/miner pair, DDP gather, m-per-class batches."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downstream.metric import m_per_class_batches
from downstream.metric_losses import (
    QuadrupletLoss,
    build_criterion,
    expand_embeddings,
    expansion_indices,
    mine_quadruplets,
    quadruplet_loss,
)
from downstream.settings import LISTWISE_LOSSES, LOSS_MINERS


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# -- quadruplet ------------------------------------------------------------------------------------

def quadruplet_toy():
    # a = (0, 0), p = (0.3, 0) share class 0; class 1 at (0.4, 0); class 2 at (0.4, 0.25)
    emb = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.4, 0.0], [0.4, 0.25]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    return emb, labels


def test_quadruplet_loss_equals_hand_computed_formula():
    emb, labels = quadruplet_toy()
    # (a, p, n1, n2) = (0, 1, 2, 3): d_ap 0.3, d_an1 0.4, d_n1n2 0.25
    #   [0.3 - 0.4 + 0.2]_+ + [0.3 - 0.25 + 0.1]_+ = 0.1 + 0.15 = 0.25
    # (1, 0, 2, 3): d_ap 0.3, d_an1 0.1, d_n1n2 0.25
    #   [0.3 - 0.1 + 0.2]_+ + [0.3 - 0.25 + 0.1]_+ = 0.4 + 0.15 = 0.55       mean: 0.4
    idx = [torch.tensor(v) for v in ([0, 1], [1, 0], [2, 2], [3, 3])]
    loss = quadruplet_loss(emb, *idx, margin1=0.2, margin2=0.1)
    assert loss.item() == pytest.approx(0.4, abs=1e-12)
    # an easy quadruplet contributes zero: push n1 and n2 far away
    far = torch.tensor([[0.0, 0.0], [0.3, 0.0], [5.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    assert quadruplet_loss(far, *idx, margin1=0.2, margin2=0.1).item() == 0.0


def test_quadruplet_mining_is_batch_hard_and_loss_uses_it():
    emb, labels = quadruplet_toy()
    a, p, n1, n2 = mine_quadruplets(emb, labels)
    got = sorted(zip(a.tolist(), p.tolist(), n1.tolist(), n2.tolist()))
    assert got == [(0, 1, 2, 3), (1, 0, 2, 3)]
    loss = QuadrupletLoss(margin1=0.2, margin2=0.1)(emb, labels)
    assert loss.item() == pytest.approx(0.4, abs=1e-12)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_quadruplet_needs_a_third_class():
    emb = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    assert len(mine_quadruplets(emb, labels)[0]) == 0
    loss = QuadrupletLoss()(emb, labels)
    assert loss.item() == 0.0
    loss.backward()  # still connected to the graph
    with pytest.raises(ValueError, match="margin2"):
        QuadrupletLoss(margin1=0.1, margin2=0.2)


# -- Embedding Expansion ---------------------------------------------------------------------------

def test_synthetic_points_lie_on_the_segment_then_have_unit_norm_and_the_pairs_label():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # 3 + 1 + 6 = 10 unordered positive pairs
    points = 3
    raw = expand_embeddings(emb, labels, points, normalize=False)
    n = raw.num_original
    assert n == 9 and len(raw.pair_i) == 10 and len(raw.embeddings) == 9 + 10 * points
    torch.testing.assert_close(raw.embeddings[:n], emb)
    for k in range(n, len(raw.embeddings)):
        u = raw.pair_of[k].item()
        i, j = raw.pair_i[u].item(), raw.pair_j[u].item()
        assert labels[i] == labels[j] == raw.labels[k]
        z, a, b = raw.embeddings[k], emb[i], emb[j]
        t = torch.dot(z - a, b - a) / torch.dot(b - a, b - a)
        assert 0.0 < t.item() < 1.0
        torch.testing.assert_close(z, a + t * (b - a))  # on the segment, not just the line
    # evenly spaced: t = 1/4, 2/4, 3/4 for the points of one pair
    first = raw.embeddings[n : n + points]
    a, b = emb[raw.pair_i[0]], emb[raw.pair_j[0]]
    ts = [(torch.dot(z - a, b - a) / torch.dot(b - a, b - a)).item() for z in first]
    assert ts == pytest.approx([0.25, 0.5, 0.75])

    normed = expand_embeddings(emb, labels, points)
    torch.testing.assert_close(normed.embeddings[n:].norm(dim=1), torch.ones(10 * points, dtype=torch.float64))
    torch.testing.assert_close(normed.embeddings[n:], F.normalize(raw.embeddings[n:], dim=1))
    assert torch.equal(normed.labels, raw.labels)


def test_gradient_reaches_both_endpoints_through_synthetic_points():
    emb = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    batch = expand_embeddings(emb, torch.tensor([0, 0, 1, 2]), 2)
    batch.embeddings[4:].sum().backward()
    assert emb.grad[0].abs().sum() > 0 and emb.grad[1].abs().sum() > 0
    assert emb.grad[2].abs().sum() == 0 and emb.grad[3].abs().sum() == 0


def brute_force_hardest(emb: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> tuple[int, int]:
    """Closest (x, n) with x in `rows` and labels[n] != labels[x], by enumeration."""
    best = (math.inf, -1, -1)
    for x in rows:
        for n in range(len(emb)):
            if labels[n] != labels[x]:
                best = min(best, ((emb[x] - emb[n]).norm().item(), x, n))
    return best[1], best[2]


def test_hardest_negative_of_an_anchor_is_a_synthetic_point():
    # class 0 at 0 and 120 degrees; class 1 at -40 and +30 degrees. The synthetic class-1 points lie
    # at about -17 and +7 degrees once normalized, nearer the anchor at 0 than either original.
    emb = torch.tensor([unit(0), unit(120), unit(-40), unit(30)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    batch = expand_embeddings(emb, labels, 2)
    a, p, neg = expansion_indices(batch, "triplet")
    row = (a == 0).nonzero().item()
    assert p[row].item() == 1
    _, expected = brute_force_hardest(batch.embeddings, batch.labels, [0])
    assert neg[row].item() == expected
    assert neg[row].item() >= batch.num_original, "the hardest negative should be synthetic"
    assert batch.labels[neg[row]].item() == 1

    # quadruplet form: n1 the same synthetic point (two classes only: no n2 -> no quadruplets)
    assert len(expansion_indices(batch, "quadruplet")[0]) == 0


def test_hardest_negative_pair_uses_synthetic_points_of_the_positive_pair():
    # class 0 pair at -60 and 60 degrees: its synthetic points sit at -30 and 30 degrees; the class-1
    # point at 25 degrees is closest to the synthetic point at 30, not to either original.
    emb = torch.tensor([unit(-60), unit(60), unit(25), unit(180)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    batch = expand_embeddings(emb, labels, 2)
    a1, p, a2, n = expansion_indices(batch, "pair")
    group = [0, 1] + [k for k in range(batch.num_original, len(batch.labels)) if batch.pair_of[k] == 0]
    x_expected, n_expected = brute_force_hardest(batch.embeddings, batch.labels, group)
    for row in (a1 == 0).nonzero().flatten().tolist() + (a1 == 1).nonzero().flatten().tolist():
        assert (a2[row].item(), n[row].item()) == (x_expected, n_expected)
    assert x_expected >= batch.num_original and batch.pair_of[x_expected] == 0
    assert n_expected == 2


@pytest.mark.parametrize("form", ["pair", "triplet", "quadruplet"])
def test_expansion_mining_matches_brute_force_on_random_batches(form):
    torch.manual_seed(1)
    emb = F.normalize(torch.randn(12, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    batch = expand_embeddings(emb, labels, 2)
    tuples = expansion_indices(batch, form)
    e, lab = batch.embeddings, batch.labels
    assert len(tuples[0]) == 4 * 6  # every ordered original positive pair
    for row in range(len(tuples[0])):
        a, p = tuples[0][row].item(), tuples[1][row].item()
        assert a < batch.num_original and p < batch.num_original and lab[a] == lab[p] and a != p
        if form == "pair":
            u = next(k for k in range(len(batch.pair_i))
                     if {batch.pair_i[k].item(), batch.pair_j[k].item()} == {a, p})
            group = [a, p] + [k for k in range(batch.num_original, len(lab)) if batch.pair_of[k] == u]
            assert (tuples[2][row].item(), tuples[3][row].item()) == brute_force_hardest(e, lab, group)
        else:
            n1 = tuples[2][row].item()
            assert n1 == brute_force_hardest(e, lab, [a])[1]
            if form == "quadruplet":
                n2 = tuples[3][row].item()
                others = [k for k in range(len(lab)) if lab[k] not in (lab[a], lab[n1])]
                assert n2 == min(others, key=lambda k: (e[n1] - e[k]).norm().item())


# -- every loss builds and trains --------------------------------------------------------------------

LOSS_MINER_PAIRS = [(loss, miner) for loss, miners in LOSS_MINERS.items() for miner in miners]
# Embedding Expansion mines tuples: it does not apply to the listwise AP losses (refused, tested below)
CASES = [(loss, miner, e) for loss, miner in LOSS_MINER_PAIRS for e in (0, 2) if not (e and loss in LISTWISE_LOSSES)]


@pytest.mark.parametrize("loss,miner,expansion", CASES)
def test_every_loss_gives_a_finite_loss_with_gradients(loss, miner, expansion):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 6)
    x = torch.randn(24, 8)
    labels = torch.arange(6).repeat_interleave(4)
    criterion = build_criterion(loss, miner, expansion_points=expansion)
    out = criterion(F.normalize(head(x), dim=1), labels)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    out["loss"].backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    if expansion:
        assert out["synthetic_points"].item() == 6 * 6 * expansion


def test_embedding_expansion_changes_the_loss():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(16, 4), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    plain = build_criterion("triplet", "hard")(emb, labels)["loss"]
    expanded = build_criterion("triplet", "hard", expansion_points=2)(emb, labels)["loss"]
    assert not torch.isclose(plain, expanded)


# -- DDP: the global batch is mined, gradients match a single process --------------------------------

DDP_CONFIGS = [dict(loss="triplet", miner="hard"), dict(loss="multi_similarity", miner="none", expansion_points=2)]


def _ddp_worker(rank: int, world: int, port: int, emb: torch.Tensor, labels: torch.Tensor, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = len(emb) // world
        for i, config in enumerate(DDP_CONFIGS):
            local = emb[rank * share : (rank + 1) * share].clone().requires_grad_()
            out = build_criterion(**config)(local, labels[rank * share : (rank + 1) * share])
            out["loss"].backward()
            # numpy, not tensors: a tensor sent through a queue is shared by a file descriptor that dies with us
            queue.put((i, rank, out["loss"].item(), local.grad.numpy().copy()))
    finally:
        dist.destroy_process_group()


def test_two_workers_mine_the_global_batch():
    """Each worker's loss is the global batch's, and its gradient is world_size x its rows' share of it."""
    import torch.multiprocessing as mp

    torch.manual_seed(3)
    emb = F.normalize(torch.randn(16, 4), dim=1)
    # every class on both ranks, so a rank's positives and hardest negatives live partly on the other rank
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, emb, labels, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=300) for _ in range(2 * len(DDP_CONFIGS))), key=lambda r: r[:2])
    for p in procs:
        p.join(timeout=60)
    for i, config in enumerate(DDP_CONFIGS):
        full = emb.clone().requires_grad_()
        reference = build_criterion(**config)(full, labels)["loss"]
        reference.backward()
        for _, rank, value, grad in [r for r in results if r[0] == i]:
            assert value == pytest.approx(reference.item(), rel=1e-5), config
            # DDP averages the two workers' gradients, so each must carry twice its rows' share
            np.testing.assert_allclose(grad / 2, full.grad[rank * 8 : (rank + 1) * 8].numpy(), rtol=1e-4, atol=1e-6)
    assert all(p.exitcode == 0 for p in procs)


# -- m-per-class batches ---------------------------------------------------------------------------

def test_m_per_class_batches_groups_ranks_and_randomness():
    labels = np.repeat(np.arange(10), 30)
    rng_labels = np.random.default_rng(0).permutation(labels)
    kw = dict(images_per_class=4, batch_size=16, num_batches=5, seed=7, epoch=0, world_size=2)
    r0 = m_per_class_batches(rng_labels, rank=0, **kw)
    r1 = m_per_class_batches(rng_labels, rank=1, **kw)
    assert len(r0) == len(r1) == 5
    for b0, b1 in zip(r0, r1):
        assert len(b0) == len(b1) == 16
        for b in (b0, b1):
            groups = rng_labels[b].reshape(4, 4)
            assert (groups == groups[:, :1]).all(), "each group of 4 is one class"
        both = np.concatenate([b0, b1])
        assert len(np.unique(both)) == 32, "no image twice in the global batch"
        classes = rng_labels[both].reshape(8, 4)[:, 0]
        assert len(np.unique(classes)) == 8, "8 groups from 10 classes: all distinct"
        assert not set(rng_labels[b0]) & set(rng_labels[b1]), "ranks hold disjoint classes"
    assert m_per_class_batches(rng_labels, rank=0, **kw)[0].tolist() == r0[0].tolist()  # deterministic
    other_epoch = m_per_class_batches(rng_labels, rank=0, **{**kw, "epoch": 1})
    assert other_epoch[0].tolist() != r0[0].tolist()
    assert len({tuple(sorted(set(rng_labels[b]))) for b in r0}) > 1, "class choice varies per step"


def test_m_per_class_batches_with_fewer_classes_than_groups():
    labels = np.repeat(np.arange(3), 20)
    (batch,) = m_per_class_batches(labels, images_per_class=4, batch_size=24, num_batches=1, seed=0, epoch=0)
    groups = labels[batch].reshape(6, 4)
    assert (groups == groups[:, :1]).all()
    assert sorted(np.bincount(groups[:, 0], minlength=3).tolist()) == [2, 2, 2], "classes cycle evenly"
    assert len(np.unique(batch)) == 24
    with pytest.raises(ValueError, match="at least 2 classes"):
        m_per_class_batches(np.zeros(10, dtype=int), images_per_class=2, batch_size=4, num_batches=1, seed=0, epoch=0)


@pytest.mark.parametrize("loss", ["fastap", "smoothap"])
def test_listwise_ap_losses_fall_on_a_fixed_batch(loss):
    """FastAP and Smooth-AP through the criterion: m-per-class groups in any order, the loss falls as a linear
    embedding is trained on a fixed batch (and a batch with unequal class counts is refused by Smooth-AP)."""
    from downstream.metric_losses import build_criterion

    torch.manual_seed(0)
    labels = torch.tensor([2, 2, 0, 0, 1, 1, 2, 2, 0, 0, 1, 1])  # 4 of each class, groups not contiguous
    x = torch.randn(12, 16) + torch.nn.functional.one_hot(labels, 16).float() * 0.5
    head = torch.nn.Linear(16, 8)
    criterion = build_criterion(loss, "none")
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    values = []
    for _ in range(30):
        out = criterion(torch.nn.functional.normalize(head(x), dim=1), labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        values.append(float(out["loss"]))
    assert values[-1] < values[0] * 0.7, values[::5]
    if loss == "smoothap":
        with pytest.raises(ValueError, match="same number of images of every class"):
            criterion(torch.randn(5, 8), torch.tensor([0, 0, 0, 1, 1]))


def test_listwise_losses_reject_embedding_expansion_and_miners():
    from pydantic import ValidationError

    from downstream.settings import MetricSettings

    with pytest.raises(ValidationError, match="does not apply"):
        MetricSettings(loss="smoothap", embedding_expansion={"enabled": True})
    with pytest.raises(ValidationError, match="does not fit loss 'fastap'"):
        MetricSettings(loss="fastap", miner="hard")


def test_ap_loss_stage_trains_under_ray_train(tmp_path, ray_session):
    """A metric stage with Smooth-AP, the stricter of the two listwise losses about its batches, under Ray Train
    (2 workers, a global batch of 10 classes x 4 gathered from both): the epoch loss falls and retrieval is
    reported. (FastAP goes through the same criterion; its fall is tested above.)"""
    loss = "smoothap"
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.runner import PipelineRun

    cfg = validate_config({
        "name": f"ap-{loss}", "seed": 0, "data": {"source": "digits", "train_subset": 400, "eval_subset": 200},
        "backbone": {"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "image_size": 16},
        "ray": {"num_workers": 2}, "registry": {"enabled": False},
        "stages": [{"name": "m", "kind": "metric", "epochs": 3, "batch_size": 40, "log_every_steps": 100,
                    "optimizer": {"lr": 0.003},
                    "settings": {"loss": loss, "images_per_class": 4, "embedding_dim": 32}}]})
    summary = PipelineRun(cfg, tmp_path / "out", log=lambda m: None).run()
    stage = summary["stages"]["m"]
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(stage["run_id"], "loss")
    losses = [h.value for h in sorted(history, key=lambda h: h.step)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert 0.0 < stage["metrics"]["recall_at_1"] <= 1.0
