"""The MLflow pyfunc model of a registered backbone, logged as "models from code" (no pickle).

MLflow stores this file's source with the model; loading runs it, and `load_context` rebuilds the
backbone from the `backbone` artifact (safetensors + backbone.json) with `pipeline.backbones.load_backbone`.
`predict` takes images (N, C, H, W), (N, H, W, C) or grayscale (N, H, W), uint8 or floats in [0, 1],
and returns the pooled embeddings (N, D) float32.
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class BackboneEmbedder(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.backbones import load_backbone

        self.model, self.meta = load_backbone(context.artifacts["backbone"], with_meta=True)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        from pretext.embeddings import embed_images

        images = np.asarray(model_input)
        if images.ndim == 3:  # a grayscale batch (N, H, W)
            images = images[:, None]
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W) or (N, H, W, C), got shape {images.shape}")
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            images = images.transpose(0, 3, 1, 2)
        if images.dtype != np.uint8:
            images = np.clip(np.rint(images * 255.0 if images.max() <= 1.0 else images), 0, 255).astype(np.uint8)
        meta = self.meta
        return embed_images(self.model, np.ascontiguousarray(images), input_size=meta["input_size"],
                            mean=meta["mean"], std=meta["std"], in_chans=meta["in_chans"],
                            input_transform=meta.get("input_transform", "rgb"), device="cpu")


mlflow.models.set_model(BackboneEmbedder())
