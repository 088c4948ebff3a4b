"""The bad-input matrix: every case ends in a counted skip, a converted image, or a clear error.

| input                                         | outcome                                  | where          |
|-----------------------------------------------|------------------------------------------|----------------|
| corrupt JPEG, truncated JPEG/PNG, 0-byte file | skipped, counted, reason logged          | FILE_CASES     |
| text file named .jpg                          | skipped, counted                         | FILE_CASES     |
| 20000x20000 PNG (header only, never decoded)  | skipped by the decompression-bomb guard  | FILE_CASES     |
| RGBA, LA, 16-bit gray, CMYK, palette, 1-bit   | loaded, converted to RGB                 | FILE_CASES     |
| empty folder, missing path, all files bad     | exit 2, message names the path           | RUN_CASES      |
| YAML syntax error, missing config file        | exit 2, line/column or path              | RUN_CASES      |
| unknown method, misspelled key                | exit 2, key path and a suggestion        | RUN_CASES      |
| pixels baseline over pixels_max_gib           | exit 2, images, bytes, limit, what to do | test_pixels_   |
| artifact of another architecture, as init too | BackboneError naming the architecture    | test_backbone_ |
| corrupted / truncated safetensors             | BackboneError "corrupted or unreadable"  | test_backbone_ |
| unsafe deserialisation in the code base       | none: torch.load(weights_only=True), yaml.safe_load, no pickle.load | test_no_unsafe_ |

Unit-level variants live in test_data.py, test_config.py and test_backbones.py; this file checks the
outcome a user sees (the loader's skip list, the CLI's exit code and message).
"""

from __future__ import annotations

import ast
import io
import json
import re
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import backbone_artifact
from pipeline.data import load_images

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("pipeline", "pretext", "downstream", "clustering", "bench")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header that claims width x height RGB pixels, with a tiny IDAT: nothing large is allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _encoded(fmt: str, mode: str = "RGB", size: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _save(mode: str, color, **kwargs):
    def write(path: Path) -> None:
        Image.new(mode, (20, 20), color).save(path, **kwargs)
    return write


def _palette(path: Path) -> None:
    im = Image.new("P", (20, 20), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.save(path)


def _gray16(path: Path) -> None:
    Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(path)  # 128 * 257


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


# file name -> (writer, "skip" + the whole reason as a pattern ({path}: the file's path) | "load" + expected RGB
# at the centre)
FILE_CASES = {
    "corrupt.jpg": (_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 8),
                    ("skip", r"UnidentifiedImageError: cannot identify image file '{path}'")),
    "truncated.jpg": (lambda p: p.write_bytes(_encoded("JPEG")[:-400]),
                      ("skip", r"OSError: image file is truncated \(\d+ bytes not processed\)")),
    "truncated.png": (lambda p: p.write_bytes(_encoded("PNG")[:3000]), ("skip", r"OSError: image file is truncated")),
    "zero-bytes.png": (_bytes(b""), ("skip", r"empty file \(0 bytes\)")),
    "not-an-image.jpg": (_bytes(b"name,label\nfoo,1\n" * 50),
                         ("skip", r"UnidentifiedImageError: cannot identify image file '{path}'")),
    "huge-20000x20000.png": (_bytes(huge_png_header()),
                             ("skip", r"exceeds max_image_pixels=\d+ \(decompression bomb guard\): .+")),
    "rgba-transparent.png": (_save("RGBA", (255, 0, 0, 0)), ("load", (255, 255, 255))),
    "rgba-opaque.png": (_save("RGBA", (255, 0, 0, 255)), ("load", (255, 0, 0))),
    "gray-alpha.png": (_save("LA", (10, 255)), ("load", (10, 10, 10))),
    "gray-16bit.png": (_gray16, ("load", (128, 128, 128))),
    "cmyk.jpg": (_save("CMYK", (0, 255, 255, 0), format="JPEG", quality=100), ("load", "red")),
    "palette.png": (_palette, ("load", (0, 255, 0))),
    "one-bit.bmp": (_save("1", 1), ("load", (255, 255, 255))),
}


@pytest.fixture(scope="module")
def loaded_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    for name, (write, _) in FILE_CASES.items():
        write(root / name)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "good.png")
    logs: list[str] = []
    ds = load_images("folder", root=str(root), image_size=8, log=logs.append)
    return ds, logs


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_image_file_case(loaded_folder, name):
    ds, logs = loaded_folder
    outcome, expected = FILE_CASES[name][1]
    skipped = {Path(p).name: reason for p, reason in ds.skipped}
    paths = {Path(p).name: p for p, _ in ds.skipped}
    loaded = {Path(p).name: ds.images[i] for i, p in enumerate(ds.ids)}
    if outcome == "skip":
        assert name in skipped and name not in loaded
        # the exact reason of this kind of damage, not any message that mentions an error
        pattern = expected.replace("{path}", re.escape(str(paths[name])))
        assert re.fullmatch(pattern, skipped[name]), skipped[name]
        assert any(line.startswith("skipped ") and name in line for line in logs)
    else:
        assert name not in skipped, skipped.get(name)
        pixels = loaded[name]
        assert pixels.shape == (3, 8, 8) and pixels.dtype == np.uint8
        r, g, b = (int(v) for v in pixels[:, 4, 4])
        if expected == "red":
            assert r > 200 and g < 60 and b < 60, (r, g, b)
        else:
            assert max(abs(r - expected[0]), abs(g - expected[1]), abs(b - expected[2])) <= 1, (r, g, b)


def test_skips_are_counted(loaded_folder):
    ds, logs = loaded_folder
    n_skip = sum(1 for _, (o, _) in FILE_CASES.values() if o == "skip")
    assert len(ds.skipped) == n_skip and len(ds) == len(FILE_CASES) - n_skip + 1
    assert any(f"skipped {n_skip} unreadable file(s)" in line for line in logs)


def test_huge_image_header_is_rejected_before_decoding(tmp_path):
    """Even with the guard raised above 400M pixels, our own check fires on the header, before decoding."""
    (tmp_path / "huge.png").write_bytes(huge_png_header())
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    ds = load_images("folder", root=str(tmp_path), image_size=8, max_image_pixels=10_000, log=lambda s: None)
    [(path, reason)] = ds.skipped
    assert path.endswith("huge.png") and "max_image_pixels=10000" in reason


# ----------------------------------------------------------------------------------------------
# runs that cannot start: exit code 2 and a message, no traceback, nothing created in MLflow

GOOD_STAGES = "stages: [{name: simclr, kind: pretext, method: simclr, epochs: 1}]"


def _all_bad(root: Path) -> str:
    root.mkdir()
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_text("not a jpeg")
    return f"data: {{source: folder, root: {root}}}\n{GOOD_STAGES}\n"


RUN_CASES = {
    "empty folder": (lambda t: (t / "empty").mkdir() or f"data: {{source: folder, root: {t / 'empty'}}}\n{GOOD_STAGES}\n",
                     r"no image files .* found under .*empty"),
    "missing path": (lambda t: f"data: {{source: folder, root: {t / 'nowhere'}}}\n{GOOD_STAGES}\n",
                     r"folder .*nowhere does not exist"),
    "only unreadable files": (lambda t: _all_bad(t / "bad"), r"none of 2 image files could be read"),
    "yaml syntax error": (lambda t: "data: {source: digits\nstages: [\n", r"YAML syntax error at line \d+, column \d+"),
    "unknown method": (lambda t: "data: {source: digits}\nstages: [{name: s, kind: pretext, method: simclrr, epochs: 1}]\n",
                       r"stages\[s\]\.method: unknown pretext method 'simclrr'.*did you mean 'simclr'"),
    "misspelled key": (lambda t: f"data: {{source: digits}}\nbackbone: {{nmae: resnet18}}\n{GOOD_STAGES}\n",
                       r"backbone\.nmae: unknown key"),
    "misspelled stage key": (lambda t: "data: {source: digits}\nstages: [{name: s, kind: pretext, method: simclr, epoch: 1}]\n",
                             r"stages\[s\]\.epoch"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
@pytest.mark.parametrize("command", ["run", "retrain"])
def test_run_cannot_start(tmp_path, capsys, case, command):
    from pipeline.cli import main

    make, pattern = RUN_CASES[case]
    config = tmp_path / "config.yaml"
    config.write_text(make(tmp_path))
    out = tmp_path / "out"
    assert main([command, str(config), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, err, re.S), err
    assert not (out / "mlflow.db").exists()


def test_pixels_baseline_over_its_memory_limit(tmp_path, capsys):
    """input: pixels holds both splits as float32: past pixels_max_gib the run is refused before it starts,
    with the images, the bytes, the limit and what to do instead."""
    from pipeline.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("data: {source: digits}\n"
                      "stages: [{name: px, kind: evaluate, input: pixels, pixels_max_gib: 1.0e-4}]\n")
    out = tmp_path / "out"
    assert main(["run", str(config), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert re.search(r"stage 'px': the raw-pixel baseline .* would hold \d+ images .* \(\d+ bytes\), over its limit "
                     r"pixels_max_gib: 0.0001 GiB\. Evaluate a backbone input instead, or subsample the splits with "
                     r"data.train_subset / data.eval_subset", err, re.S), err
    assert not (out / "mlflow.db").exists()


def test_missing_config_file(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# backbone artifacts


def test_backbone_weights_of_another_architecture(tmp_path):
    """backbone.json says resnet18, the weights are a resnet34's: loading and stage init both refuse."""
    import torch

    from pipeline.backbones import BackboneError, load_backbone
    from pipeline.trainer import TrainJob, build_stage_method

    r18, r34 = backbone_artifact(tmp_path, "resnet18"), backbone_artifact(tmp_path, "resnet34")
    (r18 / "model.safetensors").write_bytes((r34 / "model.safetensors").read_bytes())
    with pytest.raises(BackboneError, match=r"does not match architecture 'resnet18'"):
        load_backbone(r18)
    job = TrainJob(stage={"name": "refine", "method": "simclr", "settings": {}, "channels_last": False},
                   backbone={"name": "resnet18", "small_image_stem": True, "stem_stride": 2, "in_chans": 3,
                             "kwargs": {}, "image_size": 16},
                   seed=0, data=[], mean=[0.5] * 3, std=[0.2] * 3, init_artifact=str(r18))
    with pytest.raises(BackboneError, match=r"does not match architecture 'resnet18'"):
        build_stage_method(job, torch.device("cpu"))
    meta = json.loads((r34 / "backbone.json").read_text())
    meta["in_chans"] = 1  # an artifact for grayscale input used where the method needs 3 channels
    (r34 / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match=r"takes 1 channel\(s\), method 'simclr' needs 3"):
        build_stage_method(TrainJob(**{**job.__dict__, "init_artifact": str(r34)}), torch.device("cpu"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_backbone_corrupted_safetensors(tmp_path, damage):
    from pipeline.backbones import BackboneError, load_backbone

    path = backbone_artifact(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07garbage" * 64, "empty": b""}[damage])
    with pytest.raises(BackboneError, match=r"corrupted or unreadable safetensors"):
        load_backbone(path)


def test_backbone_unreadable_metadata(tmp_path):
    from pipeline.backbones import BackboneError, load_backbone

    path = backbone_artifact(tmp_path)
    (path / "backbone.json").write_text("{not json")
    with pytest.raises(BackboneError, match=r"unreadable metadata"):
        load_backbone(path)


# ----------------------------------------------------------------------------------------------
# safety: nothing in the code base deserialises arbitrary objects


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                yield node, f"{func.value.id}.{func.attr}"
            elif isinstance(func, ast.Name):
                yield node, func.id


def unsafe_calls(source: str, label: str) -> list[str]:
    """Calls that could unpickle or construct arbitrary objects, as 'file:line: call' strings."""
    tree = ast.parse(source, filename=label)
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module in ("pickle", "yaml", "torch", "dill", "cloudpickle") for alias in node.names}
    unsafe_names = imported & {"load", "loads", "Unpickler", "unsafe_load", "full_load"}
    problems = []
    for node, name in _calls(tree):
        where = f"{label}:{node.lineno}: {name}"
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where} without weights_only=True")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
            problems.append(f"{where}: use yaml.safe_load")
        elif name.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve") and \
                name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
            problems.append(where)
        elif name in ("np.load", "numpy.load") and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                and keywords["allow_pickle"].value:
            problems.append(f"{where} with allow_pickle=True")
        elif name in unsafe_names:
            problems.append(f"{where} (imported from an unsafe module)")
    return problems


def test_no_unsafe_deserialisation():
    files = [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")] + sorted((ROOT / "tests").glob("*.py"))
    assert len(files) > 20
    problems = [line for path in files for line in unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)


def test_the_safety_check_catches_violations():
    """The checker above must flag each pattern it looks for, and accept the safe forms."""
    bad = textwrap.dedent("""
        import torch, yaml, pickle
        import numpy as np
        from pickle import loads
        torch.load("x")
        torch.load("x", weights_only=False)
        yaml.load(open("c"))
        pickle.load(open("f", "rb"))
        np.load("a.npy", allow_pickle=True)
        loads(b"")
        torch.load("x", weights_only=True)
        yaml.safe_load("a: 1")
        np.load("a.npy")
    """)
    problems = unsafe_calls(bad, "bad.py")
    assert [int(p.split(":")[1]) for p in problems] == [5, 6, 7, 8, 9, 10], problems
