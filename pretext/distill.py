"""Knowledge distillation from a frozen teacher: the student backbone learns to reproduce the teacher's embeddings.

What it follows:
  - Hinton, Vinyals & Dean 2015 (knowledge distillation) for the idea of a student fitting a teacher's outputs,
    here without labels: the teacher's image embedding is the target, as in feature/representation distillation
    (FitNets, Romero et al. 2015: a learned projection from the student's features to the teacher's).
  - Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent": teacher and student see
    *the same* augmented view (consistent teaching), aggressive augmentation including mixup, long schedules.
  - LightlyTrain's distillation (docs.lightly.ai/train, methods/distillation), whose published recipe is: one view
    per image, mixup of the batch with a shuffled copy of itself (lambda ~ U(0, 1)) shown to both networks, a
    linear projection (truncated-normal init, std 0.02) from the student's features to the teacher's dimension,
    the teacher frozen and kept out of the checkpoint. Their v1 matches softmax similarity distributions of
    student and teacher against a queue of L2-normalized teacher embeddings (a "pseudo classifier", temperature
    0.07); their v2 regresses the student's projected *feature map*, resized to the teacher's patch grid, onto
    the teacher's last blocks' patch tokens with a plain MSE.

Our version works on pooled embeddings (what every backbone artifact here embeds with), for any timm student and
any teacher, CNN or ViT, without matching feature-map grids:
    t = teacher(x)  (B, D_t), frozen, no grad        s = head(student(x))  (B, D_t), head linear or a small MLP
    loss "cosine" (default): mean(1 - cos(s, t)): scale-free, so it needs no knowledge of the teacher's feature
                  scale and its values are comparable across teachers (0 = perfect, 1 = orthogonal);
    loss "mse":    mean((s - t)^2) on the raw embedding (v2's loss, on pooled features);
    loss "queue":  cross-entropy H(softmax(t'K/T), softmax(s'K/T)) with t', s' unit vectors and K the batch's own
                  teacher embeddings plus a FIFO queue of earlier ones (v1's loss).
The feature-map (dense) variant of v2 is not implemented.

Targets: "view" (default) is the consistent teaching above, a teacher forward per step. "cached" is Beyer et al.'s
"fixed teacher": the teacher embeds each training image once, unaugmented, and the student's augmented views learn
those fixed targets -- weaker on long schedules in their study, but with no teacher forward per step the student
gets more steps for the same time, which is what a short CPU budget lacks (bench/pretrained.py compares both).

Teacher handling: the teacher is an `nn.Module` built by the pipeline (pipeline/teachers.py) and handed in; it maps
a [0, 1] batch to (B, D_t) and does its own resize, channel mapping and normalization (`Teacher`). It is kept
*outside* the module tree (not a registered submodule), so it is not in `state_dict()` (checkpoints hold the
student, the head, the queue and a fingerprint of the teacher's weights; the teacher is rebuilt from its spec),
not in `parameters()` (never in an optimizer group), not seen by DDP (no gradient buckets, no buffer broadcasts)
and never switched to train mode by the loop. `_apply` forwards `.to(device)` and the like to it. The fingerprint
makes a strict resume refuse a checkpoint taken with other teacher weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.base import Method
from pretext.embeddings import embed_sharded, lab_lightness, map_chunks, match_channels
from pretext.settings import DistillSettings
from pretext.transforms import EvalTransform, Normalize, SimCLRAugment, to_float


class Teacher(nn.Module):
    """A frozen embedding model with its own input: resize to `input_size`, channels (or CIE L for colorization
    artifacts), normalization by its own mean/std. `forward` takes a float (B, C, H, W) batch in [0, 1] and
    returns float32 (B, dim) under no_grad; it always stays in eval mode."""

    def __init__(self, module: nn.Module, *, input_size: int, mean: Sequence[float], std: Sequence[float],
                 in_chans: int = 3, input_transform: str = "rgb") -> None:
        super().__init__()
        if input_transform not in ("rgb", "lab_l"):
            raise ValueError(f"unknown teacher input_transform {input_transform!r}")
        self.module = module
        self.input_size = int(input_size)
        self.in_chans = int(in_chans)
        self.input_transform = input_transform
        self.normalize = Normalize(mean, std)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # BatchNorm statistics and dropout of a teacher never change

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = lab_lightness(x) if self.input_transform == "lab_l" else match_channels(x, self.in_chans)
        if x.shape[-2:] != (self.input_size, self.input_size):
            down = min(x.shape[-2:]) > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=down)
        out = self.module(self.normalize(x))
        if out.ndim != 2:
            raise ValueError(f"the teacher must return pooled embeddings (B, D), got shape {tuple(out.shape)}")
        return out.float()


def weights_fingerprint(module: nn.Module) -> Tensor:
    """float64 (4,): element count, sum, sum of |x| and sum of x^2 over the module's state dict, computed on the
    CPU (deterministic). Two teachers with the same weights agree to rounding; other weights do not."""
    stats = torch.zeros(4, dtype=torch.float64)
    for value in module.state_dict().values():
        if torch.is_floating_point(value):
            v = value.detach().to("cpu", torch.float64)
            stats += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), v.abs().sum(),
                                  (v * v).sum()])
    return stats


def mixup(x: Tensor) -> Tensor:
    """The batch mixed with a shuffled copy of itself, one lambda ~ U(0, 1) per batch (as LightlyTrain)."""
    lam = torch.rand((), device=x.device)
    return lam * x + (1.0 - lam) * x[torch.randperm(x.shape[0], device=x.device)]


def _head(feature_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    if hidden_dim <= 0:
        head = nn.Linear(feature_dim, out_dim)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head
    return nn.Sequential(nn.Linear(feature_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


class Distill(Method):
    name = "distill"
    settings_model = DistillSettings
    # The pipeline builds the teacher from `settings.teacher` and passes `teacher=` and `teacher_dim=`.
    needs_teacher = True

    def __init__(self, backbone, feature_dim, settings, *, teacher: nn.Module, teacher_dim: int,
                 **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: DistillSettings = self.settings
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"distill: teacher must be an nn.Module, got {type(teacher).__name__}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self._teacher = (teacher,)  # a tuple: not registered as a submodule (see the module docstring)
        self.teacher_dim = int(teacher_dim)
        self.register_buffer("teacher_fingerprint", weights_fingerprint(teacher))
        self._register_load_state_dict_pre_hook(self._check_teacher_fingerprint)
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump())
        self.resize = EvalTransform(self.input_size)
        self.head = _head(self.feature_dim, s.head_hidden_dim, self.teacher_dim)
        # targets: cached -- the teacher's embedding of every training image (unaugmented), computed once by
        # `epoch_batches`; the loop then passes each batch's rows. Not a buffer: rebuilt on resume.
        self.wants_rows = s.targets == "cached"
        self.cached: Tensor | None = None
        self.queue = None
        if s.loss == "queue":
            from pretext.moco import KeyQueue

            self.queue = KeyQueue(s.queue_size, self.teacher_dim)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)  # .to(device), .cuda(), memory formats reach the teacher too
        return self

    def _check_teacher_fingerprint(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                   unexpected_keys, error_msgs) -> None:
        saved = state_dict.get(prefix + "teacher_fingerprint")
        if saved is None:
            return  # reported as a missing key by a strict load
        mine = self.teacher_fingerprint.detach().cpu()
        if saved.shape != mine.shape or not torch.allclose(saved.detach().cpu().to(mine.dtype), mine, rtol=1e-9,
                                                           atol=1e-6):
            error_msgs.append("distill: the checkpoint was trained against a teacher with other weights than the "
                              "one built from settings.teacher; resume with the same teacher or start afresh")

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()
        return self

    # -- pieces ----------------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        """The student's prediction of the teacher embedding (float32) for a [0, 1] batch at input size."""
        return self.head(self.encode(x)).float()

    def distill_loss(self, s: Tensor, t: Tensor) -> Tensor:
        kind = self.settings.loss
        if kind == "cosine":
            return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()
        if kind == "mse":
            return F.mse_loss(s, t)
        tn, sn = F.normalize(t, dim=1), F.normalize(s, dim=1)
        _, bank = self.queue(tn, update=self.training)  # the queue as it was before this batch went in
        keys = torch.cat([tn, bank.to(device=tn.device, dtype=tn.dtype)], dim=0)
        temperature = self.settings.temperature
        target = F.softmax(tn @ keys.t() / temperature, dim=1)
        return -(target * F.log_softmax(sn @ keys.t() / temperature, dim=1)).sum(dim=1).mean()

    # -- contract --------------------------------------------------------------------------------
    def epoch_batches(self, images: Any, *, epoch: int, rank: int, world_size: int, batch_size: int,
                      seed: int) -> list | None:
        """targets: cached -- embed every training image with the teacher once (each rank a share, all-gathered);
        the batches themselves are the default shuffled ones."""
        if self.wants_rows and self.cached is None:
            device = next(self.head.parameters()).device
            targets = embed_sharded(self._teacher_targets, images, rank=rank, world_size=world_size, device=device)
            self.cached = torch.from_numpy(targets).to(device)
        return None

    @torch.no_grad()
    def _teacher_targets(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """The teacher's embeddings of uint8 rows as they are (the teacher resizes and normalizes them itself)."""
        return map_chunks(lambda batch: self.teacher(to_float(batch)), images, dim=self.teacher_dim,
                          batch_size=batch_size, device=next(self.head.parameters()).device)

    def training_step(self, images: Tensor, rows: Tensor | None = None) -> dict[str, Any]:
        with torch.no_grad():
            x = self.augment(to_float(images))
            if self.wants_rows:
                # the fixed target of each image, looked up by row; computed here only before the cache exists
                if self.cached is None:
                    t = self.teacher(to_float(images))
                elif rows is None:
                    raise ValueError("distill: targets: cached needs the batch's rows (the training loop passes them)")
                else:
                    t = self.cached[rows.to(self.cached.device)]
            else:
                if self.settings.mixup:
                    x = mixup(x)
                t = self.teacher(x).float()
        s = self.project(x)
        with torch.autocast(device_type=s.device.type, enabled=False):
            loss = self.distill_loss(s, t)
            cosine = F.cosine_similarity(s.detach(), t, dim=1).mean()
        return {"loss": loss, "cosine": cosine}

    @torch.no_grad()
    def heldout_report(self, images: Tensor, out_dir: Any, batch_size: int = 256) -> tuple[dict[str, float], dict[str, str]]:
        """Mean cosine between the student's projection and the teacher's embedding on held-out images (resize
        only, no mixup), logged as `heldout_distill_cosine` (1 = the student reproduces the teacher)."""
        was_training = self.training
        self.eval()
        try:
            total, count = 0.0, 0
            for start in range(0, len(images), batch_size):
                x = self.resize(images[start : start + batch_size])
                total += float(F.cosine_similarity(self.project(x), self.teacher(x), dim=1).sum())
                count += x.shape[0]
        finally:
            self.train(was_training)
        return ({"distill_cosine": total / count} if count else {}), {}
