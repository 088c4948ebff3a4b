"""One lookup for every trainable method: label-free ones from `pretext`, labeled ones from `downstream`.

The training loop and the runner go through here, so a stage's `method:` name is resolved in one place
and never imported from a config string.
"""

from __future__ import annotations

from typing import Any


def _registry() -> dict[str, str]:
    import downstream
    import pretext

    return {**pretext.METHODS, **downstream.METHODS}


def method_class(name: str) -> type:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(sorted(registry))})")
    from pretext.base import import_object

    return import_object(registry[name])


def build_method(name: str, backbone: Any, feature_dim: int, settings: Any, **kwargs: Any):
    """Instantiate a registered method; its class validates `settings` with its own `settings_model`."""
    import pretext

    if name in pretext.METHODS:
        return pretext.build_method(name, backbone, feature_dim, settings, **kwargs)
    cls = method_class(name)
    model = cls.settings_model
    if not isinstance(settings, model):
        settings = model.model_validate(settings or {})
    return cls(backbone, feature_dim, settings, **kwargs)
