"""`sslpipe embed`: one split of a data source, embedded by a backbone artifact, written with its image ids.

The data are read exactly as a pipeline run reads them (pipeline.context.load_split: a folder, a manifest or
a built-in source, the memory or the stream backend), and embedded by pipeline.evaluate.backbone_features: in
this process for an in-memory split, on the Ray cluster (Ray Data actors, pipeline.cluster_embed) for a
streamed one, whose pixels never sit in this process's memory. Outputs:

- `OUT.parquet`: columns `id` (the image's path; `<source>/<split>/<row>` for built-in sources), `label`
  (int64, when the split is labelled) and `embedding` (fixed-size list of float32), written in row chunks;
  the schema metadata holds the backbone's metadata and the class names.
- `OUT.npy`: the (N, D) float32 embeddings, row i for line i of `<stem>.ids.txt`; `<stem>.labels.npy` when
  labelled.

Files that could not be read are left out, named on stderr and in `<stem>.skipped.tsv` (path, reason).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import ConfigError

OUTPUT_SUFFIXES = (".parquet", ".npy")
PARQUET_ROWS_PER_GROUP = 16384


def data_config(**fields: Any):
    """A validated `data:` section (pipeline.config.DataConfig) from the command line's options."""
    from pydantic import ValidationError

    from pipeline.config import DataConfig

    try:
        return DataConfig.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'data'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"embed: invalid data options: {problems}") from None


def sidecar(out: Path, suffix: str) -> Path:
    """`emb.parquet` -> `emb<suffix>` (e.g. `emb.ids.txt`, `emb.skipped.tsv`)."""
    return out.with_name(out.stem + suffix)


def check_output(out: Path) -> None:
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"embed: --out {out}: the file name must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if out.is_dir():
        raise ConfigError(f"embed: --out {out} is a folder; name a file")


def image_ids(imageset) -> list[str]:
    """Source paths when the split has them, else `<source>/<split>/<row>`."""
    if imageset.ids is not None:
        return [str(i) for i in imageset.ids]
    return [f"{imageset.source}/{imageset.split}/{i}" for i in range(len(imageset))]


def write_parquet(out: Path, features, ids: list[str], labels: np.ndarray | None, metadata: dict[str, str],
                  rows_per_group: int = PARQUET_ROWS_PER_GROUP) -> None:
    """id, label (when given), embedding (fixed-size list float32) in row groups of `rows_per_group`, reading
    `features` (an array or a memory map) one group at a time; written beside `out`, then renamed onto it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clustering.files import atomic_output

    dim = int(features.shape[1]) if len(features) else 0
    fields = [pa.field("id", pa.string())]
    if labels is not None:
        fields.append(pa.field("label", pa.int64()))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
    schema = pa.schema(fields, metadata=metadata)
    with atomic_output(out, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for start in range(0, len(ids), rows_per_group):
            stop = min(start + rows_per_group, len(ids))
            block = np.ascontiguousarray(features[start:stop], dtype=np.float32)
            columns = [pa.array(ids[start:stop], pa.string())]
            if labels is not None:
                columns.append(pa.array(labels[start:stop], pa.int64()))
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), pa.float32()), dim))
            writer.write_batch(pa.record_batch(columns, schema=schema))


def write_npy(out: Path, features, ids: list[str], labels: np.ndarray | None) -> None:
    """`out` (N, D) float32, `<stem>.ids.txt` (one id per line) and `<stem>.labels.npy` when labelled."""
    from clustering.files import atomic_output

    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise ConfigError(f"embed: the id {bad!r} holds a line break and cannot go in a .ids.txt file; "
                          "write .parquet instead")
    if isinstance(features, np.memmap) or getattr(features, "filename", None):
        os.replace(features.filename, out)  # the cluster path's memory map is already the .npy file
    else:
        with atomic_output(out, "wb") as f:
            np.save(f, np.asarray(features, dtype=np.float32))
    with atomic_output(sidecar(out, ".ids.txt")) as f:
        f.writelines(f"{i}\n" for i in ids)
    labels_path = sidecar(out, ".labels.npy")
    if labels is not None:
        with atomic_output(labels_path, "wb") as f:
            np.save(f, labels.astype(np.int64))
    else:
        labels_path.unlink(missing_ok=True)


def write_skipped(out: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """`<stem>.skipped.tsv` (path, reason) when files were skipped; an old one is removed otherwise."""
    path = sidecar(out, ".skipped.tsv")
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    from pipeline.store import write_text_atomic

    clean = [(str(p).replace("\t", " ").replace("\n", " "), str(r).replace("\t", " ").replace("\n", " "))
             for p, r in skipped]
    write_text_atomic(path, "path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in clean))
    return path


def embed_split(artifact: Path, data, out: Path, *, batch_size: int = 256, ray_address: str | None = None,
                backbone_spec: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed split `data.train_split` of `data` (a DataConfig) by the artifact and write `out`
    (.parquet or .npy, see the module docstring). Returns a summary: rows, dim, skipped, seconds, files."""
    from pipeline.backbones import read_backbone_meta
    from pipeline.config import PipelineConfig
    from pipeline.context import load_split
    from pipeline.evaluate import backbone_features

    out = Path(out)
    check_output(out)
    meta = read_backbone_meta(artifact)
    started_ray = []

    def start_ray() -> None:  # a Ray this command started is stopped at the end; one already running is kept
        import ray

        from pipeline.trainer import ray_init

        if not ray.is_initialized():
            ray_init(ray_address)
            started_ray.append(True)

    started = time.time()
    config = PipelineConfig.model_construct(name="embed", seed=0, data=data)
    cache_root = Path(data.cache_dir) if data.cache_dir else out.parent / "pixel_cache"
    try:
        imageset = load_split(config, "train", log, cache_root=cache_root, start_ray=start_ray)
        ids = image_ids(imageset)
        loaded = time.time()
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = None if isinstance(imageset.images, np.ndarray) else \
            Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            features = backbone_features(artifact, imageset.images, batch_size,
                                         out_path=scratch / "embeddings.npy" if scratch else None)
            embedded = time.time()
            metadata = {"sslpipe.backbone": backbone_spec or str(artifact),
                        "sslpipe.backbone_meta": json.dumps(meta, sort_keys=True, default=str),
                        "sslpipe.class_names": json.dumps(imageset.class_names)}
            if out.suffix == ".parquet":
                write_parquet(out, features, ids, imageset.labels, metadata)
                files = [out]
            else:
                write_npy(out, features, ids, imageset.labels)
                files = [out, sidecar(out, ".ids.txt")] + ([sidecar(out, ".labels.npy")]
                                                          if imageset.labels is not None else [])
        finally:
            if scratch is not None:
                import shutil

                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    skipped_file = write_skipped(out, imageset.skipped)
    if skipped_file is not None:  # each was named as it was skipped (or when the pixel cache was built)
        log(f"skipped {len(imageset.skipped)} unreadable file(s), listed in {skipped_file}")
    return {"rows": len(ids), "dim": int(features.shape[1]) if len(ids) else 0, "skipped": len(imageset.skipped),
            "skipped_file": skipped_file, "files": files, "streamed": scratch is not None,
            "load_s": loaded - started, "embed_s": embedded - loaded, "total_s": time.time() - started}
