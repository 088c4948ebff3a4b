"""Label-free objectives that train a backbone.

The registry below maps a method name (as written in a config) to the module and class that implement
it. Configs never name classes; importing is deferred so that reading a config stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pretext.settings import METHOD_SETTINGS, MethodSettings

if TYPE_CHECKING:  # pragma: no cover
    from pretext.base import Method

# name -> "module:Class". A new method is one module plus one line here and one in settings.py.
METHODS: dict[str, str] = {
    "simclr": "pretext.simclr:SimCLR",
    "rotation": "pretext.rotation:RotationPrediction",
    "jigsaw": "pretext.jigsaw:Jigsaw",
    "colorization": "pretext.colorization:Colorization",
    "moco": "pretext.moco:MoCo",
    "stml": "pretext.stml:STML",
    "distill": "pretext.distill:Distill",
}


# Methods that refine an existing backbone (a `refine` stage with an `input:`), not pretext methods.
REFINE_METHODS: tuple[str, ...] = ("stml",)


def method_names() -> list[str]:
    return sorted(METHODS)


def method_settings(name: str) -> type[MethodSettings]:
    """The pydantic model that validates the `settings:` block of a method."""
    if name not in METHOD_SETTINGS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    return METHOD_SETTINGS[name]


def method_class(name: str) -> type["Method"]:
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(method_names())})")
    from pretext.base import import_object

    return import_object(METHODS[name])


def build_method(name: str, backbone: Any, feature_dim: int, settings: dict | MethodSettings, **kwargs: Any) -> "Method":
    """Instantiate a registered method around a backbone; settings are validated here too."""
    model = method_settings(name)
    if not isinstance(settings, model):
        settings = model.model_validate(settings or {})
    return method_class(name)(backbone, feature_dim, settings, **kwargs)
