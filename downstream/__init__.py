"""Tasks that use labels: fine-tuning, supervised metric learning, retrieval and kNN evaluation.

Labeled training stages are methods with the same contract as `pretext.base.Method` plus
`needs_labels = True`: the training loop then calls `forward(images, labels)`. The registry maps a
stage's method name to "module:Class"; `DOWNSTREAM_SETTINGS` (torch-free) validates its settings.
"""

from __future__ import annotations

from downstream.settings import DOWNSTREAM_SETTINGS

# name -> "module:Class" of the labeled training methods.
METHODS: dict[str, str] = {
    "finetune": "downstream.finetune:Finetune",
    "metric": "downstream.metric:MetricLearning",
    "scan": "downstream.scan:SCAN",
}

__all__ = ["METHODS", "DOWNSTREAM_SETTINGS"]
