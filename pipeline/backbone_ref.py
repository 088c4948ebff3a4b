"""What a command line names a backbone by, turned into an artifact folder (model.safetensors + backbone.json).

- an artifact folder itself (e.g. `runs/demo/stages/simclr/backbone`);
- a stage folder of a finished run (`runs/demo/stages/simclr`, whose `stage.json` lists the backbone), or a
  stage name together with the run folder (`--run-dir runs/demo`, `simclr`);
- a model registry URI, `models:/<name>@<alias>` or `models:/<name>/<version>` (pipeline.registry), read from
  the tracking URI given, else MLFLOW_TRACKING_URI, else the run folder's own `mlflow.db`.

Whatever does not resolve is a BackboneError (CLI exit 2) that says what was tried.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.backbones import META_FILE, BackboneError, read_backbone_meta
from pipeline.store import read_record, record_path


def _stage_backbone(run_dir: Path, stage: str) -> Path:
    record = read_record(run_dir, stage)
    if record is None:
        raise BackboneError(f"run {run_dir} has no finished stage '{stage}' ({record_path(run_dir, stage)} is "
                            "missing or unreadable)")
    recorded = (record.get("artifacts") or {}).get("backbone")
    if not recorded:
        raise BackboneError(f"stage '{stage}' of run {run_dir} produced no backbone (its record lists none)")
    for candidate in (Path(recorded), Path(run_dir) / "stages" / stage / "backbone"):
        if (candidate / META_FILE).is_file():  # recorded paths may be relative to where the run was started
            return candidate
    raise BackboneError(f"stage '{stage}' of run {run_dir}: its backbone {recorded} is gone")


def resolve_backbone(spec: str, *, scratch: Path, run_dir: str | os.PathLike | None = None,
                     tracking_uri: str | None = None) -> Path:
    """The artifact folder `spec` names (see the module docstring); registry versions are downloaded under
    `scratch`. The folder's metadata is checked (BackboneError when it is not an artifact)."""
    if spec.startswith("models:/"):
        from pipeline.registry import resolve_model_uri
        from pipeline.tracking import default_uri

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (default_uri(Path(run_dir)) if run_dir else None)
        if not uri:
            raise BackboneError(f"{spec}: which model registry? pass --tracking-uri (or set MLFLOW_TRACKING_URI, "
                                "or --run-dir for a run's own mlflow.db)")
        artifact = resolve_model_uri(spec, uri, scratch)
    else:
        path = Path(spec).expanduser()
        if (path / META_FILE).is_file():
            artifact = path
        elif (path / "stage.json").is_file():
            artifact = _stage_backbone(path.parent.parent, path.name)
        elif run_dir is not None and "/" not in spec and not path.exists():
            artifact = _stage_backbone(Path(run_dir), spec)
        elif not path.exists():
            hint = "" if run_dir else " (a stage name needs --run-dir)"
            raise BackboneError(f"backbone {spec}: no such artifact folder, stage folder or stage{hint}")
        else:
            raise BackboneError(f"backbone {spec}: not a backbone artifact (no {META_FILE}) nor a stage folder "
                                "(no stage.json)")
    read_backbone_meta(artifact)
    return artifact
