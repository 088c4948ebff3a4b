"""Distillation teachers built from a method's `settings.teacher` spec (pretext/settings.py TeacherSpec).

Here and not in `pretext` because an artifact teacher is read with `pipeline.backbones.load_backbone` (pretext must
not import pipeline); the method receives the finished module (`pretext.distill.Teacher`) and its dimension.
Never downloads weights: a timm teacher gets its weights from a local .safetensors state dict.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneError, create_timm_model, load_backbone



def _timm_teacher(spec) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm model without classifier, with the spec's weights (strict, classifier keys dropped) or a seeded random
    init."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    kwargs = dict(spec.kwargs or {})
    torch.manual_seed(spec.seed)  # every worker (and a resume) builds the same random teacher
    model = create_timm_model(spec.name, in_chans=int(kwargs.get("in_chans", 3)), kwargs=kwargs,
                              key="settings.teacher")
    if spec.weights is not None:
        try:
            state = load_file(spec.weights)
        except (SafetensorError, OSError, ValueError) as err:
            raise BackboneError(f"settings.teacher.weights: {spec.weights} is unreadable ({err})") from None
        # A classifier in the file (an ImageNet state dict such as `make weights` writes) is not part of a
        # num_classes=0 teacher: dropped, as backbone.weights drops it; every other key must fit (strict).
        from pipeline.weights import classifier_prefixes

        expected, prefixes = model.state_dict(), classifier_prefixes(model)
        state = {k: v for k, v in state.items() if k in expected or not k.startswith(prefixes)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise BackboneError(f"settings.teacher.weights: {spec.weights} does not match timm model "
                                f"'{spec.name}' (num_classes=0): {first}") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    facts = {
        "input_size": spec.input_size or int((cfg.get("input_size") or (3, 224, 224))[-1]),
        "mean": list(spec.mean or cfg.get("mean") or IMAGENET_MEAN),
        "std": list(spec.std or cfg.get("std") or IMAGENET_STD),
        "in_chans": int(kwargs.get("in_chans", 3)),
        "input_transform": "rgb",
    }
    return model, facts


def build_teacher(spec: Any) -> tuple[torch.nn.Module, int]:
    """The frozen teacher (eval mode, no gradients, on the CPU) and its embedding dimension.

    `spec`: a TeacherSpec or its dict. An artifact teacher embeds as the artifact does (a refine stage's head
    included) at the artifact's input size and normalization; a timm teacher at `input_size`/`mean`/`std` from
    the spec, else from timm's pretrained_cfg of that architecture (ImageNet statistics for most).
    """
    from pretext.distill import Teacher
    from pretext.settings import TeacherSpec

    if not isinstance(spec, TeacherSpec):
        spec = TeacherSpec.model_validate(spec)
    with torch.random.fork_rng(devices=[]):  # building a teacher leaves the caller's random stream as it was
        if spec.artifact is not None:
            module, meta = load_backbone(spec.artifact, with_meta=True)
            facts = {"input_size": spec.input_size or meta["input_size"], "mean": meta["mean"], "std": meta["std"],
                     "in_chans": meta["in_chans"], "input_transform": meta.get("input_transform", "rgb")}
        else:
            module, facts = _timm_teacher(spec)
    teacher = Teacher(module, **facts)
    with torch.no_grad():
        probe = teacher(torch.zeros(2, 3, teacher.input_size, teacher.input_size))
    return teacher, int(probe.shape[1])
