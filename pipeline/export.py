"""`sslpipe export`: a backbone artifact as one ONNX graph or one safetensors file.

ONNX: the artifact's exported module (what `load_backbone` returns: backbone, or backbone + pooling + head for
refine/metric stages) with its preprocessing baked in by default, so the graph takes what an image file gives:

    input  "images":     float32 (N, 3, S, S), RGB in [0, 1], S = the artifact's input_size (resize first)
    output "embeddings": float32 (N, D)

Inside the graph: RGB -> the backbone's channels (luma for 1-channel backbones, CIE L* for colorization
backbones), then (x - mean) / std with the artifact's mean and std: exactly pretext.embeddings.prepare_batch
after its resize. `raw_input=True` exports the module alone (input: the backbone's normalized tensor). The batch
axis is dynamic. The file is checked before it is kept: onnxruntime runs it on a random batch of another size
than the one exported, and a max abs difference to torch above `tolerance` (1e-4) fails the export
(ExportMismatch, exit 1). Needs the `onnx` and `onnxruntime` packages (`pip install sslpipe[export]`);
without them MissingPackageError (exit 2) names what is missing.

safetensors: the state dict in one file, the artifact's metadata (backbone.json) as JSON in the header under
`sslpipe.backbone_meta`, the artifact format under `format`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ONNX_PACKAGES = ("onnx", "onnxruntime")
DEFAULT_TOLERANCE = 1e-4
META_KEY = "sslpipe.backbone_meta"


class MissingPackageError(Exception):
    """An optional package that an export format needs is not installed (CLI exit 2)."""


class ExportMismatch(Exception):
    """The exported file does not compute what the torch module computes (CLI exit 1)."""


class Preprocessed(nn.Module):
    """RGB in [0, 1] at the input size -> the module's embeddings, with the artifact's channel mapping and
    normalization in the graph (pretext.embeddings.prepare_batch without the resize)."""

    def __init__(self, module: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.in_chans = int(meta["in_chans"])
        self.lab = meta.get("input_transform", "rgb") == "lab_l"
        self.register_buffer("mean", torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from pretext.embeddings import lab_lightness, match_channels

        x = lab_lightness(images) if self.lab else match_channels(images, self.in_chans)
        return self.module((x - self.mean) / self.std)


def missing_packages(names=ONNX_PACKAGES) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _input_shape(meta: dict[str, Any], raw_input: bool, batch: int) -> tuple[int, int, int, int]:
    size = int(meta["input_size"])
    channels = int(meta["in_chans"]) if raw_input else 3
    return batch, channels, size, size


def export_onnx(artifact: Path, out: Path, *, opset: int = 17, batch: int = 2, raw_input: bool = False,
                tolerance: float = DEFAULT_TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Write `out` (.onnx) after onnxruntime matched torch within `tolerance`; returns the check's figures."""
    missing = missing_packages()
    if missing:
        raise MissingPackageError(
            f"export --format onnx needs the Python package(s) {', '.join(missing)}, which are not installed "
            f"(pip install {' '.join(missing)}, or pip install 'sslpipe[export]')")
    import onnx
    import onnxruntime as ort

    from pipeline.backbones import load_backbone

    module, meta = load_backbone(artifact, with_meta=True)
    graph = (module if raw_input else Preprocessed(module, meta)).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        example = torch.rand(*_input_shape(meta, raw_input, batch), generator=torch.Generator().manual_seed(seed))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: needs onnx only
            torch.onnx.export(graph, (example,), tmp, dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
        model = onnx.load(tmp)
        expects = ("float32 (N, {1}, {2}, {3}), RGB in [0, 1]" if not raw_input else
                   "float32 (N, {1}, {2}, {3}), normalized with mean/std").format(*_input_shape(meta, raw_input, 1))
        for key, value in {META_KEY: json.dumps(meta, sort_keys=True, default=str), "sslpipe.input": expects}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        # another batch size than the exported one: the check covers the dynamic batch axis too
        check = torch.rand(*_input_shape(meta, raw_input, batch + 1), generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            expected = graph(check).numpy()
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = session.run(["embeddings"], {"images": check.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatch(f"export: onnxruntime returned shape {got.shape}, torch {expected.shape}")
        max_diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        if not max_diff <= tolerance:
            raise ExportMismatch(f"export: onnxruntime differs from torch by up to {max_diff:.3g} on a batch of "
                                 f"{batch + 1} (limit {tolerance:g}); {out} not written")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"max_abs_diff": max_diff, "checked_batch": batch + 1, "input": expects, "out": out}


def export_safetensors(artifact: Path, out: Path) -> dict[str, Any]:
    """One .safetensors file: the artifact's state dict, its metadata as JSON in the header. The artifact is
    loaded first, so only weights that rebuild their module are exported."""
    from safetensors.torch import load_file, save_file

    from pipeline.backbones import ARTIFACT_FORMAT, WEIGHTS_FILE, load_backbone

    _, meta = load_backbone(artifact, with_meta=True)
    state = load_file(str(Path(artifact) / WEIGHTS_FILE))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": ARTIFACT_FORMAT, META_KEY: json.dumps(meta, sort_keys=True, default=str)}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=header)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"tensors": len(state), "out": out}


def read_safetensors_meta(path: Path) -> dict[str, Any]:
    """The artifact metadata in the header of a file written by :func:`export_safetensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[META_KEY])
