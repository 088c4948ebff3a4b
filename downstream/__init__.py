"""Tasks that use labels: fine-tuning, supervised metric learning, retrieval and kNN evaluation.

Labeled training stages are methods with the same contract as `pretext.base.Method` plus
`needs_labels = True`: the training loop then calls `forward(images, labels)`. The registry maps a
stage's method name to "module:Class"; `DOWNSTREAM_SETTINGS` (torch-free) validates its settings.
"""

from __future__ import annotations

from downstream.settings import FinetuneSettings

# name -> "module:Class"; filled in as labeled training stages are added.
METHODS: dict[str, str] = {
    "finetune": "downstream.finetune:Finetune",
}

DOWNSTREAM_SETTINGS: dict[str, type] = {
    "finetune": FinetuneSettings,
}
