"""MoCo (He et al. 2020; v2: Chen et al. 2020; v3: Chen, Xie & He 2021): a momentum key encoder.

The query encoder (backbone + projection head, plus a prediction head in v3) learns; the key encoder is
an exponential moving average of it and gets no gradients, so keys change slowly and stay comparable
across steps. v2 contrasts each query with its key against a FIFO queue of past keys; v3 drops the
queue and uses the keys of the current (global) batch as negatives.

Both versions use the symmetric loss: each view is a query once, with the other view's key as its
positive, and the two losses are averaged. In v2 the keys of both views are enqueued (2B per worker
and step), as in the symmetric variant of the MoCo reference code.

Batch-norm leak guard (`shuffle_bn`): under DDP with "shuffle", the key batch is shuffled across
workers before the key encoder and unshuffled after it, so a key's batch statistics come from other
images than its query's. In a single process lightly's `batch_shuffle` is used as asked, but BN
statistics do not depend on the order of a batch, so there it changes nothing. "sync" asks the trainer
for SyncBatchNorm; torch's SyncBatchNorm only runs on GPU-like devices (on CPU its forward raises
"SyncBatchNorm expected input tensor to be on GPU ..."), so on CPU the method falls back to "shuffle"
with a warning. "none" does neither.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import (
    batch_shuffle,
    batch_shuffle_distributed,
    batch_unshuffle,
    batch_unshuffle_distributed,
    concat_all_gather,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.utils import dist as lightly_dist
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor

from pretext.base import Method
from pretext.settings import MoCoSettings
from pretext.transforms import SimCLRAugment

# progress in [0, 1] is mapped onto this many steps of lightly's integer cosine schedule.
_SCHEDULE_RESOLUTION = 1_000_000


def _distributed_world() -> int:
    """World size of the default process group; 1 when torch.distributed is not in use."""
    return lightly_dist.world_size() if torch.distributed.is_available() else 1


def _sync_bn_supported(device: torch.device) -> bool:
    """Device types on which torch's SyncBatchNorm forward accepts input (CPU is not one of them)."""
    return device.type in {"cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()}


def momentum_at(progress: float, base: float) -> float:
    """Key-encoder momentum after a fraction `progress` of the stage: cosine from `base` up to 1.

    Why through lightly's `cosine_schedule`: it is the schedule the lightly MoCo examples use; it counts
    integer steps, so progress is placed on a fine grid whose last step is progress 1.
    """
    p = min(1.0, max(0.0, float(progress)))
    return cosine_schedule(round(p * _SCHEDULE_RESOLUTION), _SCHEDULE_RESOLUTION + 1, base, 1.0)


class KeyQueue(MemoryBankModule):
    """MoCo's dictionary: a FIFO ring of the last `size` keys, (size, dim), unit vectors.

    Built on lightly's MemoryBankModule (buffers, random unit-vector init, snapshot on `forward`), with
    two changes that say why it is a subclass:
      - enqueueing wraps around the end of the ring. lightly's version writes only the part of a batch
        that fits before the end and drops the rest, so unless `size` is a multiple of the global key
        batch the queue would not hold the last `size` keys;
      - the bank and its pointer are persistent buffers, so a checkpoint holds them and a resumed
        stage continues with the same negatives.
    With `gather_distributed` every worker enqueues the keys of all workers (in rank order), so the
    queues stay identical across workers (DDP's buffer broadcast from rank 0 then changes nothing).
    """

    def __init__(self, size: int, dim: int, gather_distributed: bool = True) -> None:
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        super().__init__(size=(size, dim), gather_distributed=gather_distributed, feature_dim_first=False)
        # Re-registering an existing buffer with persistent=True only flips its persistence.
        self.register_buffer("bank", self.bank, persistent=True)
        self.register_buffer("bank_ptr", self.bank_ptr, persistent=True)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and _distributed_world() > 1:
            batch = concat_all_gather(batch.contiguous())
        size = self.size[0]
        total = batch.shape[0]
        batch = batch.detach()[-size:]  # of a batch longer than the ring only the newest keys survive
        ptr = int(self.bank_ptr)
        start = (ptr + total - batch.shape[0]) % size
        slots = (start + torch.arange(batch.shape[0], device=self.bank.device)) % size
        self.bank[slots] = batch.to(device=self.bank.device, dtype=self.bank.dtype)
        self.bank_ptr[0] = (ptr + total) % size

    def ordered(self) -> Tensor:
        """The stored keys oldest first (the slot at the pointer is the next to be overwritten)."""
        return torch.roll(self.bank, shifts=-int(self.bank_ptr), dims=0)


class MoCo(Method):
    name = "moco"
    settings_model = MoCoSettings

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: MoCoSettings = self.settings
        self.version = s.version
        self.temperature = float(s.temperature)
        self.base_momentum = float(s.momentum)
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump())
        v3 = s.version == "v3"
        # v2: 2-layer MLP without BN; v3: 3-layer MLP with BN everywhere plus a 2-layer predictor.
        self.projection_head = MoCoProjectionHead(
            input_dim=self.feature_dim, hidden_dim=s.hidden_dim, output_dim=s.output_dim,
            num_layers=3 if v3 else 2, batch_norm=v3,
        )
        self.prediction_head = (
            BYOLPredictionHead(input_dim=s.output_dim, hidden_dim=s.hidden_dim, output_dim=s.output_dim) if v3 else None
        )
        # The key encoder starts as an exact copy (also of a backbone loaded from an earlier stage).
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        # v3 has no queue (memory_bank_size is ignored); v2 with size 0 falls back to in-batch negatives.
        self.queue = KeyQueue(s.memory_bank_size, s.output_dim) if (not v3 and s.memory_bank_size > 0) else None
        self.shuffle_keys = s.shuffle_bn == "shuffle"
        self.current_momentum = self.base_momentum

    # -- pieces ----------------------------------------------------------------------------------
    def query_embed(self, x: Tensor) -> Tensor:
        """Unit-norm queries (float32) of a view; v3 adds the prediction head."""
        z = self.projection_head(self.encode(x))
        if self.prediction_head is not None:
            z = self.prediction_head(z)
        return F.normalize(z.float(), dim=1)

    @torch.no_grad()
    def key_embed(self, x: Tensor) -> Tensor:
        """Unit-norm keys (float32) of a view from the momentum encoder, batch-shuffled when asked."""
        x = self.normalize(x).contiguous(memory_format=self.memory_format)
        distributed = _distributed_world() > 1
        if self.shuffle_keys:
            x, order = batch_shuffle_distributed(x) if distributed else batch_shuffle(x)
        k = self.projection_head_momentum(self.backbone_momentum(x))
        if self.shuffle_keys:
            k = batch_unshuffle_distributed(k, order) if distributed else batch_unshuffle(k, order)
        return F.normalize(k.float(), dim=1)

    def _loss_with_queue(self, q: Tensor, k: Tensor, negatives: Tensor) -> Tensor:
        """InfoNCE: the positive logit first, then one logit per queued key."""
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ negatives.t()
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def _loss_in_batch(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE against the keys of the global batch (gathered without gradient: keys have none)."""
        world = _distributed_world()
        keys = concat_all_gather(k.contiguous()) if world > 1 else k
        labels = torch.arange(q.shape[0], device=q.device) + (lightly_dist.rank() if world > 1 else 0) * q.shape[0]
        return F.cross_entropy(q @ keys.t() / self.temperature, labels)

    # -- contract --------------------------------------------------------------------------------
    def training_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            x0, x1 = self.augment(torch.cat([images, images], dim=0)).chunk(2, dim=0)
        if not self.settings.symmetric:
            return {"loss": self._one_sided_loss(x0, x1), "momentum": self.current_momentum}
        # Each view through each encoder on its own, as the reference code, so BN never mixes views.
        q0, q1 = self.query_embed(x0), self.query_embed(x1)
        k0, k1 = self.key_embed(x0), self.key_embed(x1)
        # The loss in fp32 even under bf16 autocast: logits over thousands of negatives need the range.
        with torch.autocast(device_type=q0.device.type, enabled=False):
            if self.queue is not None:
                # Snapshot of the queue before this step's keys go in, so no key is its own negative.
                _, negatives = self.queue(torch.cat([k0, k1], dim=0), update=self.training)
                negatives = negatives.to(q0.device)
                loss = 0.5 * (self._loss_with_queue(q0, k1, negatives) + self._loss_with_queue(q1, k0, negatives))
            else:
                loss = 0.5 * (self._loss_in_batch(q0, k1) + self._loss_in_batch(q1, k0))
                if self.version == "v3":
                    loss = loss * (2.0 * self.temperature)  # MoCo v3's scaling; keeps lr tuning comparable
        return {"loss": loss, "momentum": self.current_momentum}

    def _one_sided_loss(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The original MoCo loss: view 0 is the query, view 1 the key (half the encoder passes)."""
        q, k = self.query_embed(x0), self.key_embed(x1)
        with torch.autocast(device_type=q.device.type, enabled=False):
            if self.queue is not None:
                _, negatives = self.queue(k, update=self.training)
                return self._loss_with_queue(q, k, negatives.to(q.device))
            loss = self._loss_in_batch(q, k)
            return loss * (2.0 * self.temperature) if self.version == "v3" else loss

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """EMA of the query encoder into the key encoder, momentum on a cosine ramp to 1."""
        m = momentum_at(progress, self.base_momentum)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)
        self.current_momentum = m

    def wants_sync_batchnorm(self) -> bool:
        """True for shuffle_bn 'sync' on a device where SyncBatchNorm runs; on CPU fall back to shuffling."""
        if self.settings.shuffle_bn != "sync":
            return False
        device = next(self.parameters()).device
        if _sync_bn_supported(device):
            return True
        warnings.warn(
            f"moco: shuffle_bn 'sync' needs SyncBatchNorm, which torch runs only on GPU-like devices, not on "
            f"{device.type}; using shuffled BN across workers instead",
            RuntimeWarning,
            stacklevel=2,
        )
        self.shuffle_keys = True
        return False
