"""Large Margin Nearest Neighbour (Weinberger & Saul, JMLR 2009): a Mahalanobis distance learned from labels.

Where `mahalanobis` only whitens with the training covariance, LMNN learns a linear map L so that, in the
mapped space, each point's k target neighbours (its nearest same-class points, fixed at the start) are pulled
close, and every differently-labelled point (an impostor) is pushed at least a unit margin further away than
each target neighbour:

    loss = (1 - mu) * mean_{i, j in N(i)} |L(x_i - x_j)|^2
         + mu * sum_{i, j in N(i), l: y_l != y_i} [margin + |L(x_i - x_j)|^2 - |L(x_i - x_l)|^2]_+ / n

Fitted with Adam on a seeded, bounded sample of the training embeddings (the impostor term is O(n^2 k) per
step), centred and divided by one global scale (their RMS distance to the mean, so that the unit margin means
the same for any embedding), starting from the identity: the embedding's own Euclidean distance, which LMNN
then adjusts. Not per-feature standardisation: like whitening, it lifts low-variance, mostly noisy features of
a CNN embedding to the weight of the informative ones (bench/RESULTS.md, "Retrieval"). The `metric-learn`
package's LMNN would add a dependency for a loop this short; this one runs in torch on the CPU in about a
minute for 2000 points of 1280 dimensions.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_lmnn(x: np.ndarray, labels: np.ndarray, *, k: int = 3, max_points: int = 2000, iterations: int = 200,
             lr: float = 0.01, mu: float = 0.5, margin: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix): x -> (x - mean) @ matrix is the learned map, Euclidean distance after it the learned
    distance (downstream.retrieval wraps it like the fitted whitening)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"fit_lmnn: need (N, D) embeddings with N labels, got {x.shape} and {labels.shape}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(x), size=min(max_points, len(x)), replace=False))
    mean = x.mean(axis=0)
    scale = float(np.sqrt(((x[rows] - mean) ** 2).sum(axis=1).mean()))
    scale = scale if scale > 1e-12 else 1.0
    z = torch.from_numpy((x[rows] - mean) / scale).float()
    y = torch.from_numpy(labels[rows])
    same = y[:, None] == y[None, :]
    counts = same.sum(dim=1) - 1
    if int(counts.min()) < 1:
        keep = counts >= 1  # a class with one sampled point has no target neighbour: left out
        z, y = z[keep], y[keep]
        same = y[:, None] == y[None, :]
    n, d = z.shape
    kk = int(min(k, int((same.sum(dim=1) - 1).min())))
    if n < 3 or kk < 1:
        raise ValueError("fit_lmnn: need at least 2 points of a class and another class in the sample")
    with torch.no_grad():
        dist = torch.cdist(z, z).pow(2)
        dist.masked_fill_(~same | torch.eye(n, dtype=torch.bool), float("inf"))
        targets = dist.topk(kk, dim=1, largest=False).indices  # (n, kk): nearest same-class points
    other = ~same
    L = torch.nn.Parameter(torch.eye(d))
    opt = torch.optim.Adam([L], lr=lr)
    for _ in range(iterations):
        mapped = z @ L.T
        sq = torch.cdist(mapped, mapped).pow(2)
        d_target = sq.gather(1, targets)  # (n, kk)
        pull = d_target.mean()
        hinge = (margin + d_target[:, :, None] - sq[:, None, :]).clamp(min=0) * other[:, None, :]
        loss = (1 - mu) * pull + mu * hinge.sum() / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mean, L.detach().double().numpy().T / scale
