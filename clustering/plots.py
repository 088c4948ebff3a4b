"""Diagnostic figures for embeddings and clusters.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` API on
an explicit Agg canvas and never touch ``pyplot`` or the global backend, so
these functions are safe to call from worker threads / Ray actors and do not
change plotting behaviour for anything else in the process. The cluster grid
is assembled as a numpy mosaic and written with PIL, which is fast and gives
exact pixel geometry. All PNGs are written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .files import atomic_output

__all__ = ["embedding_2d", "scatter_plot", "cluster_grid", "cluster_pages", "image_page", "silhouette_plot"]

# Grid geometry (pixels).
_PAD = 4  # gap between tiles and around the mosaic
_MIN_TILE = 64  # small images (MNIST 28x28) are upscaled by an integer factor to reach this
_FONT_SIZE = 11


def _save(path, write) -> str:
    """``write(file)`` into :func:`~clustering.files.atomic_output` (binary); returns ``path`` as str."""
    with atomic_output(path, "wb") as f:
        write(f)
    return os.fspath(path)


def _image_rows(images, who: str):
    """``(images, shape)`` after checking uint8 (N, C, H, W), C in {1, 3}. An array-like with ``shape`` and
    ``dtype`` that reads rows from disk (a memory map, sharded files) stays as it is: the figures read only
    the rows they show (:func:`_rows`), never the whole set."""
    if not (hasattr(images, "shape") and hasattr(images, "dtype")):
        images = np.asarray(images)
    shape = tuple(int(d) for d in images.shape)
    if len(shape) != 4 or shape[1] not in (1, 3):
        raise ValueError(f"{who}: images must be (N, C, H, W) with C in {{1, 3}}, got {shape}")
    if np.dtype(images.dtype) != np.uint8:
        raise ValueError(f"{who}: images must be uint8, got {images.dtype}")
    return images, shape


def _rows(images, index) -> np.ndarray:
    """``images[index]`` as an ndarray: each row read once, in ascending order (what a reader of shards or
    memory maps does best), then put in the order asked for."""
    unique, inverse = np.unique(np.asarray(index, dtype=np.int64), return_inverse=True)
    return np.asarray(images[unique])[inverse.reshape(-1)]


# --------------------------------------------------------------------------- 2-D embedding


def embedding_2d(x, *, method: str = "tsne", max_points: int = 5000, seed: int = 0):
    """Project features to 2-D for plotting.

    t-SNE/UMAP cost grows super-linearly, so at most ``max_points`` rows are
    used, drawn uniformly without replacement with ``seed``; the kept row
    indices are returned (sorted) so callers can pick the matching labels /
    cluster ids: ``coords, idx = embedding_2d(f); scatter_plot(coords, {"label": y[idx]}, ...)``.

    Args:
        x: (N, D) finite features, N >= 2.
        method: ``"tsne"`` (sklearn, PCA init, perplexity min(30, M-1)) or
            ``"umap"`` (needs the optional ``umap-learn`` package, imported lazily).
        max_points: subsample cap M.
        seed: seeds both the subsample and the embedding.

    Returns:
        ``(coords, index)``: float32 (M, 2) and int64 (M,) row indices into x.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embedding_2d: x must be 2-D (N, D), got shape {x.shape}")
    if method not in ("tsne", "umap"):
        raise ValueError(f"embedding_2d: method must be 'tsne' or 'umap', got {method!r}")
    n = x.shape[0]
    if max_points < 2:
        raise ValueError(f"embedding_2d: max_points must be >= 2, got {max_points}")
    if n < 2:
        raise ValueError(f"embedding_2d: need at least 2 points, got {n}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("embedding_2d: x contains NaN/inf values")

    rng = np.random.default_rng(seed)
    if n > max_points:
        index = np.sort(rng.choice(n, size=max_points, replace=False)).astype(np.int64)
    else:
        index = np.arange(n, dtype=np.int64)
    sub = np.ascontiguousarray(x[index])
    m = sub.shape[0]

    if method == "tsne":
        from sklearn.manifold import TSNE

        coords = TSNE(
            n_components=2, init="pca", perplexity=float(min(30, m - 1)), random_state=seed
        ).fit_transform(sub)
    else:
        try:
            import umap  # slow to import (numba) -> only when asked for
        except Exception as e:  # missing, or a broken numba/llvmlite install failing at import
            raise ImportError(
                f"embedding_2d(method='umap') could not import umap-learn ({type(e).__name__}: {e}); "
                "pip install umap-learn"
            ) from e
        coords = umap.UMAP(
            n_components=2, n_neighbors=max(2, min(15, m - 1)), random_state=seed
        ).fit_transform(sub)
    return np.asarray(coords, dtype=np.float32), index


# --------------------------------------------------------------------------- scatter


def _draw_coloring(fig, ax, coords, values, name):
    """Categorical values get a tab10/tab20 legend; floats or >20 categories a colorbar."""
    from matplotlib import colormaps

    m = coords.shape[0]
    size = 12.0 if m <= 2000 else max(1.0, 12.0 * 2000 / m)
    categorical = values.dtype.kind in "biuUSO"
    if categorical:
        cats, codes = np.unique(values, return_inverse=True)
        codes = codes.ravel()
        if len(cats) <= 20:
            cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]
            for ci, cat in enumerate(cats):
                sel = codes == ci
                ax.scatter(
                    coords[sel, 0], coords[sel, 1], s=size, color=cmap(ci), label=str(cat),
                    linewidths=0, rasterized=True,
                )
            ax.legend(
                title=name, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
                markerscale=max(1.0, 30.0 / size) ** 0.5, frameon=False,
            )
            return
        sc = ax.scatter(
            coords[:, 0], coords[:, 1], c=codes, cmap="turbo", s=size, linewidths=0,
            rasterized=True,
        )
        cb = fig.colorbar(sc, ax=ax)
        cb.set_label(f"{name} ({len(cats)} values, by rank)")
        return
    sc = ax.scatter(
        coords[:, 0], coords[:, 1], c=values.astype(np.float64), cmap="viridis", s=size,
        linewidths=0, rasterized=True,
    )
    fig.colorbar(sc, ax=ax).set_label(name)


def scatter_plot(coords, colorings: dict, path, *, title: str = "") -> str:
    """Write one PNG with a side-by-side panel per coloring of the same 2-D points.

    Typical use: ``{"label": y, "cluster": c}`` to eyeball how clusters line up
    with classes on the same t-SNE layout.

    Args:
        coords: (M, 2) points (e.g. from :func:`embedding_2d`).
        colorings: name -> (M,) values; ints/strings are categorical (tab10 /
            tab20 + legend, colorbar beyond 20 categories), floats continuous.
        path: PNG destination (parent folders are created).
        title: optional figure title.

    Returns:
        ``path`` as str.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"scatter_plot: coords must be (M, 2), got shape {coords.shape}")
    if not colorings:
        raise ValueError("scatter_plot: colorings is empty; pass e.g. {'label': y}")
    arrays = {}
    for name, values in colorings.items():
        values = np.asarray(values)
        if values.shape != (coords.shape[0],):
            raise ValueError(
                f"scatter_plot: coloring {name!r} has shape {values.shape}, "
                f"expected ({coords.shape[0]},)"
            )
        arrays[name] = values

    fig = Figure(figsize=(6.5 * len(arrays), 5.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(arrays), squeeze=False)[0]
    for ax, (name, values) in zip(axes, arrays.items()):
        _draw_coloring(fig, ax, coords, values, name)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", dpi=100))


# --------------------------------------------------------------------------- cluster grid


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow without FreeType support: fixed bitmap font
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _fit(font, text: str, width: int) -> str:
    """Truncate ``text`` (with an ellipsis) so it fits in ``width`` pixels."""
    if _text_w(font, text) <= width:
        return text
    while text and _text_w(font, text + "…") > width:
        text = text[:-1]
    return text + "…" if text else ""


def cluster_grid(
    images,
    assignments,
    distances,
    path,
    *,
    per_cluster: int = 12,
    clusters=None,
    class_names=None,
) -> str:
    """Write a PNG mosaic with one row per cluster, most central members first.

    Looking at the members closest to each centroid is the quickest sanity
    check of what a cluster "means"; rows are labelled ``cluster j (n=...)``
    with the cluster size.

    Args:
        images: uint8 (N, C, H, W) with C in {1, 3}. Images smaller than 64 px
            are upscaled by an integer factor (nearest neighbour) for legibility.
        assignments: (N,) cluster id per image.
        distances: (N,) distance to the assigned centroid; within a row tiles
            are ordered by increasing distance.
        path: PNG destination (parent folders are created).
        per_cluster: tiles per row (fewer if the cluster is smaller).
        clusters: cluster ids to show, one row each, in this order; ``None`` =
            every cluster id present in ``assignments`` (sorted). Ids with no
            members give an empty row labelled ``n=0``.
        class_names: optional (N,) per-image class name (or label); when given
            each tile gets a caption and each row label adds the cluster's
            majority class and its share.

    Returns:
        ``path`` as str.
    """
    from PIL import Image, ImageDraw

    images, (n, _, h, w) = _image_rows(images, "cluster_grid")
    assignments = np.asarray(assignments).ravel()
    distances = np.asarray(distances, dtype=np.float64).ravel()
    if assignments.shape[0] != n or distances.shape[0] != n:
        raise ValueError(
            f"cluster_grid: got {n} images but {assignments.shape[0]} assignments "
            f"and {distances.shape[0]} distances"
        )
    if per_cluster < 1:
        raise ValueError(f"cluster_grid: per_cluster must be >= 1, got {per_cluster}")
    names = None
    if class_names is not None:
        if isinstance(class_names, np.ndarray):
            class_names = class_names.tolist()
        names = [str(v) for v in class_names]
        if len(names) != n:
            raise ValueError(f"cluster_grid: class_names has {len(names)} entries, expected {n}")
    rows = [int(c) for c in (np.unique(assignments) if clusters is None else clusters)]
    if not rows:
        raise ValueError("cluster_grid: no clusters to draw")

    scale = max(1, math.ceil(_MIN_TILE / h))
    th, tw = h * scale, w * scale
    font = _font()
    line_h = int(math.ceil(font.getbbox("Ag")[3])) + 2
    cap_h = line_h if names is not None else 0
    row_h = th + cap_h + _PAD

    # Per-row content: members sorted by distance, label lines.
    row_members, row_labels = [], []
    for c in rows:
        members = np.flatnonzero(assignments == c)
        order = members[np.argsort(distances[members], kind="stable")]
        row_members.append(order[:per_cluster])
        lines = [f"cluster {c} (n={members.size})"]
        if names is not None and members.size:
            vals, counts = np.unique([names[i] for i in members], return_counts=True)
            top = int(np.argmax(counts))
            lines.append(f"top: {vals[top]} ({100.0 * counts[top] / members.size:.0f}%)")
        row_labels.append(lines)
    label_w = 2 * _PAD + max(_text_w(font, s) for lines in row_labels for s in lines)

    width = label_w + per_cluster * (tw + _PAD)
    height = _PAD + len(rows) * row_h
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, members in enumerate(row_members):
        y0 = _PAD + r * row_h
        for j, tile in enumerate(_tiles(_rows(images, members), scale)):
            x0 = label_w + j * (tw + _PAD)
            canvas[y0 : y0 + th, x0 : x0 + tw] = tile

    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for r, lines in enumerate(row_labels):
        y0 = _PAD + r * row_h
        ty = y0 + max(0, (th - len(lines) * line_h) // 2)
        for k, s in enumerate(lines):
            draw.text((_PAD, ty + k * line_h), s, fill=(0, 0, 0), font=font)
        if names is not None:
            for j, i in enumerate(row_members[r]):
                x0 = label_w + j * (tw + _PAD)
                draw.text((x0, y0 + th), _fit(font, names[i], tw), fill=(60, 60, 60), font=font)
    return _save(path, lambda f: img.save(f, format="PNG"))


# --------------------------------------------------------------------------- per-cluster pages


def _tiles(images: np.ndarray, scale: int) -> list[np.ndarray]:
    out = []
    for tile in images:
        tile = tile.transpose(1, 2, 0)  # (H, W, C)
        if tile.shape[2] == 1:
            tile = np.repeat(tile, 3, axis=2)
        if scale > 1:
            tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
        out.append(tile)
    return out


def cluster_pages(
    images,
    assignments,
    distances,
    folder,
    *,
    clusters,
    per_page: int = 48,
    columns: int = 12,
    class_names=None,
) -> list[str]:
    """Write one PNG per cluster id in ``clusters`` (``cluster_000.png``, ...): its ``per_page`` most
    central members, row by row, under a title with the cluster size (and majority class).

    The overview grid shows a dozen images per cluster; a page per cluster shows enough of each one to
    judge it, including clusters that are empty (a page that says so) or tiny.

    Returns the paths, in the order of ``clusters``.
    """
    from PIL import Image, ImageDraw

    images, (n, _, h, w) = _image_rows(images, "cluster_pages")
    assignments = np.asarray(assignments).ravel()
    distances = np.asarray(distances, dtype=np.float64).ravel()
    if assignments.shape[0] != n or distances.shape[0] != n:
        raise ValueError(
            f"cluster_pages: got {n} images but {assignments.shape[0]} assignments and {distances.shape[0]} distances"
        )
    if per_page < 1 or columns < 1:
        raise ValueError(f"cluster_pages: per_page and columns must be >= 1, got {per_page} and {columns}")
    names = None
    if class_names is not None:
        names = [str(v) for v in (class_names.tolist() if isinstance(class_names, np.ndarray) else class_names)]
        if len(names) != n:
            raise ValueError(f"cluster_pages: class_names has {len(names)} entries, expected {n}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    width_digits = max(3, len(str(max([int(c) for c in clusters], default=0))))

    scale = max(1, math.ceil(_MIN_TILE / h))
    th, tw = h * scale, w * scale
    font = _font()
    line_h = int(math.ceil(font.getbbox("Ag")[3])) + 2
    cap_h = line_h if names is not None else 0
    paths = []
    for c in clusters:
        c = int(c)
        members = np.flatnonzero(assignments == c)
        order = members[np.argsort(distances[members], kind="stable")][:per_page]
        title = f"cluster {c}: {members.size} images"
        if members.size > order.size:
            title += f", the {order.size} nearest the centroid"
        if names is not None and members.size:
            vals, counts = np.unique([names[i] for i in members], return_counts=True)
            top = int(np.argmax(counts))
            title += f"; top class {vals[top]} ({100.0 * counts[top] / members.size:.0f}%)"
        if not members.size:
            title += " (empty)"
        cols = min(columns, max(1, order.size))
        rows = max(1, math.ceil(order.size / cols))
        title_h = line_h + _PAD
        width = max(_PAD + cols * (tw + _PAD), 2 * _PAD + _text_w(font, title))
        height = _PAD + title_h + rows * (th + cap_h + _PAD)
        canvas = np.full((height, width, 3), 255, dtype=np.uint8)
        for j, tile in enumerate(_tiles(_rows(images, order), scale)):
            y0 = _PAD + title_h + (j // cols) * (th + cap_h + _PAD)
            x0 = _PAD + (j % cols) * (tw + _PAD)
            canvas[y0 : y0 + th, x0 : x0 + tw] = tile
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        draw.text((_PAD, _PAD), title, fill=(0, 0, 0), font=font)
        if names is not None:
            for j, i in enumerate(order):
                y0 = _PAD + title_h + (j // cols) * (th + cap_h + _PAD)
                x0 = _PAD + (j % cols) * (tw + _PAD)
                draw.text((x0, y0 + th), _fit(font, names[i], tw), fill=(60, 60, 60), font=font)
        path = os.path.join(folder, f"cluster_{c:0{width_digits}d}.png")
        paths.append(_save(path, lambda f, img=img: img.save(f, format="PNG")))
    return paths


def image_page(images, index, path, *, title: str, captions=None, columns: int = 12) -> str:
    """Write one PNG of the images ``index`` (in that order), row by row under ``title``, each tile with up to
    two caption lines (``captions[j]``: a string, lines split on newline). E.g. the least confident images
    of a clustering, captioned with their cluster and confidence.

    Returns ``path`` as str.
    """
    from PIL import Image, ImageDraw

    images, (n, _, h, w) = _image_rows(images, "image_page")
    index = np.asarray(index, dtype=np.int64).ravel()
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"image_page: index out of range for {n} images")
    if columns < 1:
        raise ValueError(f"image_page: columns must be >= 1, got {columns}")
    lines = None
    if captions is not None:
        lines = [str(c).split("\n")[:2] for c in captions]
        if len(lines) != index.size:
            raise ValueError(f"image_page: {len(lines)} captions for {index.size} images")
    scale = max(1, math.ceil(_MIN_TILE / h))
    th, tw = h * scale, w * scale
    font = _font()
    line_h = int(math.ceil(font.getbbox("Ag")[3])) + 2
    cap_h = line_h * max((len(c) for c in lines), default=0) if lines else 0
    cols = min(columns, max(1, index.size))
    rows = max(1, math.ceil(index.size / cols))
    title_h = line_h + _PAD
    width = max(_PAD + cols * (tw + _PAD), 2 * _PAD + _text_w(font, title))
    height = _PAD + title_h + rows * (th + cap_h + _PAD)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    origins = [(_PAD + title_h + (j // cols) * (th + cap_h + _PAD), _PAD + (j % cols) * (tw + _PAD))
               for j in range(index.size)]
    for (y0, x0), tile in zip(origins, _tiles(_rows(images, index), scale) if index.size else []):
        canvas[y0 : y0 + th, x0 : x0 + tw] = tile
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    draw.text((_PAD, _PAD), title, fill=(0, 0, 0), font=font)
    for (y0, x0), caption in zip(origins, lines or []):
        for k, text in enumerate(caption):
            draw.text((x0, y0 + th + k * line_h), _fit(font, text, tw), fill=(60, 60, 60), font=font)
    return _save(path, lambda f: img.save(f, format="PNG"))


# --------------------------------------------------------------------------- choosing k


def silhouette_plot(silhouettes: dict, chosen: int, path, *, title: str = "") -> str:
    """Silhouette against k, the chosen k marked: shows whether the choice is a clear peak or a coin toss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not silhouettes:
        raise ValueError("silhouette_plot: no silhouettes to plot")
    ks = sorted(int(k) for k in silhouettes)
    values = [float(silhouettes[k]) for k in ks]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(ks, values, marker="o")
    if chosen in silhouettes:
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen k = {chosen}")
        ax.legend(frameon=False)
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("silhouette")
    ax.set_title(title or "silhouette vs k")
    ax.grid(alpha=0.3)
    return _save(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", dpi=100))
