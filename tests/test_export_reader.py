"""docs/usage.md's numpy + onnxruntime reader of an export, run as written against ``metapl predict`` on a JPEG, a
non-square PNG and a grey image; each exported file has its own JSON record, and predict takes every export format."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import REPO
from metapl.commands.cli import main
from metapl.commands.export import run_export
from metapl.commands.inference import run_predict

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is a dev dependency (pip install onnxruntime)")
pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pip install onnx)")

SIZE = 16
TOLERANCE = 1e-5  # the one docs/usage.md states


def docs_reader() -> str:
    """The Python block under "Reading an export without metapl" in docs/usage.md, as written there."""
    text = (REPO / "docs" / "usage.md").read_text()
    section = text[text.index("### Reading an export without metapl") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 20-step RGB folder run at 16 x 16 pixels, at a learning rate that makes its models confident: their
    probabilities then move with every preprocessing rule (random images, nothing to learn but noise)."""
    tmp = tmp_path_factory.mktemp("reader")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("ant", "bee", "cat"):
            for i in range(count):
                (tmp / "tree" / split / cls).mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "tree" / split / cls / f"{i}.png")
    argv = [
        *["train", "--dataset", "folder", "--data-dir", str(tmp / "tree"), "--image-size", str(SIZE)],
        *["--steps", "20", "--eval-every", "20", "--batch-size", "3", "--mu", "1", "--num-labeled", "9"],
        *["--s-lr", "0.3", "--t-lr", "0.3"],
        *["--workers", "0", "--no-tensorboard", "--no-progress", "--finetune-steps", "0", "--device", "cpu"],
        *["--out", str(tmp / "run"), "--cache-dir", str(tmp / "c")],
    ]
    assert main(argv) == 0
    return tmp / "run"


def _images(folder):
    """A large colour JPEG (decoded at 1/8 scale by the draft), a 96 x 48 PNG and a grey PNG, with smooth content so
    that resizing and cropping rules show in the probabilities."""
    folder.mkdir()
    yy, xx = np.mgrid[0:150, 0:200]
    photo = np.stack([(xx * 1.2) % 256, (yy * 1.6) % 256, ((xx + yy) * 0.7) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    wide = np.stack([(xx[:48, :96] * 2.6) % 256, (yy[:48, :96] * 5) % 256, np.full((48, 96), 90)], -1)
    Image.fromarray(wide.astype(np.uint8)).save(folder / "wide.png")
    Image.fromarray(((xx[:40, :40] * yy[:40, :40]) % 256).astype(np.uint8), "L").save(folder / "grey.png")
    return [folder / name for name in ("photo.jpg", "wide.png", "grey.png")]


def test_the_docs_reader_reproduces_predict(run_dir, tmp_path):
    code = docs_reader()
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(code, "docs/usage.md", "exec"), namespace)
    onnx_file = run_export(run_dir, fmt="onnx", output=tmp_path / "m.onnx")
    images = _images(tmp_path / "images")
    # predict with the run itself (PyTorch, the run's result), every class listed
    rows = run_predict(run_dir, images, output=tmp_path / "p.csv", top_k=3, device="cpu")
    for image, row in zip(images, rows, strict=True):
        got = namespace["classify"](str(onnx_file), str(image))
        assert set(got) == {"ant", "bee", "cat"}
        differences = [abs(float(got[name]) - p) for name, p in row["top_k"]]
        assert max(differences) < TOLERANCE, image.name
    # Each rule shows: squashing the 96 x 48 image, a bilinear resize, a JPEG decoded without the draft (measured:
    # 0.26, 1.2e-3 and 2.7e-3 at most on these images).
    wide, photo = (Image.open(images[i]).convert("RGB") for i in (1, 0))
    variants = {
        "squashed": (wide.resize((SIZE, SIZE), Image.Resampling.BICUBIC), images[1]),
        "bilinear": (ImageOps.fit(wide, (SIZE, SIZE), Image.Resampling.BILINEAR), images[1]),
        "no draft": (ImageOps.fit(photo, (SIZE, SIZE), Image.Resampling.BICUBIC), images[0]),
    }
    for name, (variant, original) in variants.items():
        variant.save(tmp_path / "variant.png")  # already 16 x 16: the reader's own steps leave it as it is
        other, right = (namespace["classify"](str(onnx_file), str(p)) for p in (tmp_path / "variant.png", original))
        assert max(abs(other[c] - right[c]) for c in right) > 100 * TOLERANCE, name


def test_each_exported_file_has_its_own_record_and_predict_takes_each(run_dir, tmp_path):
    images = _images(tmp_path / "images")
    reference = run_predict(run_dir, images, model="ema", output=tmp_path / "r.csv", device="cpu")
    for fmt, name in (("safetensors", "ema.safetensors"), ("onnx", "ema.onnx"), ("torchscript", "ema.torchscript.pt")):
        assert main(["export", str(run_dir), "--model", "ema", "--format", fmt]) == 0
        meta = json.loads((run_dir / "export" / f"{name}.json").read_text())
        assert (meta["weights"], meta["file_format"], meta["version"]) == (name, fmt, 2)
        assert meta["preprocessing"]["resize"] == {
            "size": [SIZE, SIZE],
            "interpolation": "bicubic",
            "rule": f"scale both sides by {SIZE} / min(width, height), so the shorter side becomes {SIZE}; Pillow's "
            "bicubic (a = -0.5), its kernel widened by the reduction when shrinking (antialiased)",
        }
        assert meta["preprocessing"]["decode"]["channels"] == "RGB" and meta["classes"] == ["ant", "bee", "cat"]
    for name in ("ema.safetensors", "ema.onnx", "ema.torchscript.pt"):
        rows = run_predict(run_dir / "export" / name, images, output=tmp_path / "e.csv")
        assert [[c for c, _ in r["top_k"]] for r in rows] == [[c for c, _ in r["top_k"]] for r in reference]
        assert [r["probability"] for r in rows] == pytest.approx([r["probability"] for r in reference], abs=1e-5)
