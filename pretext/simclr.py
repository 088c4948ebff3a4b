"""SimCLR (Chen et al. 2020): two augmented views, a projection head and the NT-Xent loss.

The head and the loss come from lightly; views are made in batches on the training device by
`SimCLRAugment`, so the data path costs little next to the backbone. Under DDP, lightly's NTXentLoss
gathers the embeddings of all workers so that every worker sees the global batch as negatives.
"""

from __future__ import annotations

from typing import Any

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from pretext.base import Method
from pretext.settings import SimCLRSettings
from pretext.transforms import SimCLRAugment


class SimCLR(Method):
    name = "simclr"
    settings_model = SimCLRSettings

    def __init__(self, backbone, feature_dim, settings, **kwargs: Any) -> None:
        super().__init__(backbone, feature_dim, settings, **kwargs)
        s: SimCLRSettings = self.settings
        self.augment = SimCLRAugment(input_size=self.input_size, **s.augment.model_dump())
        self.projection_head = SimCLRProjectionHead(
            input_dim=self.feature_dim, hidden_dim=s.hidden_dim, output_dim=s.output_dim, num_layers=s.num_layers
        )
        self.criterion = NTXentLoss(temperature=s.temperature, gather_distributed=s.gather_distributed)

    def training_step(self, images: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            x0, x1 = self.augment(torch.cat([images, images], dim=0)).chunk(2, dim=0)
        if self.settings.separate_view_forward:
            z0, z1 = self.projection_head(self.encode(x0)), self.projection_head(self.encode(x1))
        else:
            z0, z1 = self.projection_head(self.encode(torch.cat([x0, x1], dim=0))).chunk(2, dim=0)
        loss = self.criterion(z0.float(), z1.float())
        return {"loss": loss}
