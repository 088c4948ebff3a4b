"""Stage inputs that are not stages of this pipeline: `pretrained`, a backbone artifact folder, a registry URI.

- ``pretrained``: the configured backbone with its configured weights (`backbone.pretrained` or
  `backbone.weights`), untrained here, written once as an artifact under ``<output_dir>/inputs/``. An
  evaluate stage on it is the "before" row of every comparison.
- a path (anything with a ``/`` or starting with ``~``): a backbone artifact folder, or a stage folder of
  another run (pipeline.backbone_ref).
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a version of the MLflow model registry at the
  run's tracking URI, downloaded under ``<output_dir>/inputs/``.

Each is resolved on the driver before any stage starts (a bad one is exit 2) and stands in the run like a
reused stage: its fingerprint is a digest of the artifact's weights and metadata, so a stage trained on it is
reused while the artifact is the same and retrained when an alias moves to other weights.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipeline.config import PRETRAINED, is_external

VOLATILE_META = ("created",)  # backbone.json keys that change with every write, not with the model


def _update(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def artifact_digest(folder: Path) -> str:
    """sha256 of an artifact's weights file and its metadata (without write times): what identifies the model."""
    from pipeline.backbones import META_FILE, WEIGHTS_FILE

    h = hashlib.sha256()
    _update(h, folder / WEIGHTS_FILE)
    meta = {k: v for k, v in json.loads((folder / META_FILE).read_text()).items() if k not in VOLATILE_META}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()[:16]


def teacher_digest(stage: Any) -> str | None:
    """The content of a distillation teacher (`settings.teacher`: an artifact folder or a weights file), for the
    stage's cache key: new weights at the same path must not reuse a stage trained on the old ones."""
    teacher = (getattr(stage, "settings", None) or {}).get("teacher")
    if not isinstance(teacher, dict):
        return None
    if teacher.get("artifact"):
        return artifact_digest(Path(teacher["artifact"]).expanduser())
    if teacher.get("weights"):
        h = hashlib.sha256()
        _update(h, Path(teacher["weights"]).expanduser())
        return h.hexdigest()[:16]
    return None


def pretrained_artifact(ctx: Any) -> Path:
    """The configured backbone with the run's resolved weights, as an artifact (built once per weights file)."""
    from pipeline.backbones import META_FILE, BackboneError, build_backbone, save_backbone
    from pipeline.weights import load_resolved, normalization

    cfg = ctx.config.backbone
    if ctx.weights is None:
        raise BackboneError("input: pretrained is the configured backbone with its pretrained weights; set "
                            "backbone.pretrained: true or backbone.weights: <file>")
    folder = ctx.output_dir / "inputs" / f"{PRETRAINED}-{cfg.name}-{ctx.weights.source_sha256[:12]}"
    if (folder / META_FILE).is_file():
        return folder
    backbone, feature_dim = build_backbone(cfg.name, small_image_stem=cfg.small_image_stem,
                                           stem_stride=cfg.stem_stride, in_chans=cfg.in_chans, kwargs=cfg.kwargs)
    load_resolved(backbone, ctx.weights.job(), name=cfg.name)
    stats = normalization(cfg, ctx.weights, cfg.in_chans)
    mean, std = stats if stats is not None else ctx.train.pixel_moments().stats(cfg.in_chans)
    save_backbone(folder, backbone, name=cfg.name, small_image_stem=cfg.small_image_stem, in_chans=cfg.in_chans,
                  kwargs=cfg.kwargs, stem_stride=cfg.stem_stride, feature_dim=feature_dim,
                  input_size=cfg.image_size, mean=mean, std=std,
                  provenance={"weights": ctx.weights.provenance, "source_stage": PRETRAINED})
    return folder


def resolve_external_inputs(ctx: Any, stages: list) -> dict[str, tuple[Path, str]]:
    """input -> (artifact folder, fingerprint) for every external input the stages name."""
    from pipeline.backbone_ref import resolve_backbone

    out: dict[str, tuple[Path, str]] = {}
    for inp in sorted({getattr(s, "input", None) for s in stages if is_external(getattr(s, "input", None))}):
        if inp == PRETRAINED:
            folder = pretrained_artifact(ctx)
        else:
            scratch = ctx.output_dir / "inputs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", inp).strip("_")
            folder = resolve_backbone(inp, scratch=scratch, tracking_uri=ctx.tracking_uri)
        out[inp] = (Path(folder), artifact_digest(Path(folder)))
        ctx.log(f"input {inp}: {folder} (fingerprint {out[inp][1]})")
    return out
