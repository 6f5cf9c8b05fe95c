"""Shared fixtures: the real datasets in ../shared/data (decoded once per machine) and tiny synthetic image trees."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One intra-op thread for the session and every process it starts (set here, before any test module imports torch;
# an explicit OMP_NUM_THREADS is kept). The tests' tensors are tiny, so a second thread only adds wake-ups, and on a
# loaded 2-core machine two OpenMP threads spin waiting for each other: the suite took 20 min there instead of 3.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR10_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"
FASHION_DIR = SHARED_DATA / "fashion-mnist"
# Decoded real data survives between test sessions here (.cache/ is git-ignored): only the first session decodes.
TEST_CACHE = REPO / ".cache" / "test-data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache_dir(tmp_path_factory):
    """Keep tests that rely on the default cache folder out of the user's ~/.cache/metapl."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAPL_CACHE_DIR", str(tmp_path_factory.mktemp("metapl-cache")))
        yield


@pytest.fixture
def log_lines(caplog):
    """Call it for the lines metapl has logged in this test so far, as its console shows them (``metapl.logs``);
    ``caplog.clear()`` forgets them."""
    from metapl.logs import LineFormatter

    caplog.set_level(logging.INFO, logger="metapl")
    formatter = LineFormatter()

    def lines() -> list[str]:
        return [formatter.format(r) for r in caplog.records if r.name.split(".")[0] == "metapl"]

    return lines


@pytest.fixture(scope="session")
def cifar10_tar() -> Path:
    """Path of the real CIFAR-10 JPEG archive; skips the test when it is absent."""
    if not CIFAR10_TAR.is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz not found")
    return CIFAR10_TAR


@pytest.fixture(scope="session")
def cifar10(cifar10_tar):
    """The real CIFAR-10 copy as ``SourceData``, decoded once into ``<repo>/.cache/test-data`` and memory-mapped."""
    from metapl.data import load_dataset

    return load_dataset("cifar10", str(cifar10_tar), cache_dir=str(TEST_CACHE))


@pytest.fixture(scope="session")
def cifar10_cache_dir(cifar10) -> Path:
    """A cache folder that already holds the decoded CIFAR-10 copy: a run pointed at it decodes nothing."""
    return TEST_CACHE


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """The folder with the real Fashion-MNIST IDX files; skips the test when it is absent."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/fashion-mnist not found")
    return FASHION_DIR


def class_value(label: int) -> int:
    """The gray level that synthetic images of class ``label`` are painted with (lets tests check label order)."""
    return 30 + 60 * label


def write_image(path: Path, label: int, size: tuple[int, int], mode: str) -> None:
    """Write one synthetic image: a flat ``class_value(label)`` background with a little noise, any PIL format."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    base = np.full((size[1], size[0]), class_value(label), dtype=np.int16) + rng.integers(-3, 4, (size[1], size[0]))
    gray = np.clip(base, 0, 255).astype(np.uint8)
    image = Image.fromarray(gray, "L") if mode == "L" else Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def make_tree(tmp_path):
    """Factory for a small ImageFolder tree under tmp_path.

    ``make_tree(name, classes=("ant", "bee", "cat"), splits=("train", "test"), per_class=4, mode="RGB",
    sizes=((12, 12),), ext=".png")``; ``splits=()`` gives a single ``<class>/`` tree. Images cycle through ``sizes``
    and, with ``mode="mixed"``, alternate RGB PNG and grayscale JPEG. Returns the tree's root.
    """

    def make(
        name: str = "tree",
        *,
        classes=("ant", "bee", "cat"),
        splits=("train", "test"),
        per_class: int = 4,
        mode: str = "RGB",
        sizes=((12, 12),),
        ext: str = ".png",
    ) -> Path:
        root = tmp_path / name
        for split in splits or ("",):
            for label, cls in enumerate(classes):
                for i in range(per_class):
                    img_mode, img_ext = mode, ext
                    if mode == "mixed":
                        img_mode, img_ext = ("RGB", ".png") if i % 2 == 0 else ("L", ".jpg")
                    write_image(root / split / cls / f"{i:03d}{img_ext}", label, sizes[i % len(sizes)], img_mode)
        return root

    return make


def write_noise_tree(
    root: Path, classes, per_class: int, *, noise_hw: tuple[int, int], size: tuple[int, int], quality: int
) -> Path:
    """``root/<class>/<i>.jpg``: seeded colour fields: ``noise_hw`` noise, bilinearly upscaled to ``size`` (W, H).

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir()
        for i in range(per_class):
            noise = Image.fromarray(rng.integers(0, 256, (*noise_hw, 3), dtype=np.uint8))
            noise.resize(size, Image.Resampling.BILINEAR).save(root / cls / f"{i:03d}.jpg", quality=quality)
    return root


def make_tar(tree: Path, out: Path, *, wrapper: str | None = None) -> Path:
    """Pack ``tree`` into the archive ``out`` (compression from its suffix), optionally inside one wrapper folder."""
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(out, mode) as tf:
        tf.add(tree, arcname=wrapper or ".")
    return out


# -- accuracies counted independently of metapl.training.evaluation ---------------------------------------------


def count_accuracies(models: dict, loader) -> dict[str, float]:
    """Top-1 and top-5 % of each model (switched to eval mode) over ``loader``, counted here in plain torch.

    The reference that the trainer's summary and ``metapl eval`` are checked against: the same batches through the
    same weights give the same logits bit for bit, so the figures must agree exactly.

    Args:
        models: name -> ``nn.Module``.
        loader: yields ``(x, y)`` batches.

    Returns:
        ``{"<name>_acc": ..., "<name>_top5": ...}``.
    """
    import torch

    hits1, hits5, total = dict.fromkeys(models, 0), dict.fromkeys(models, 0), 0
    with torch.no_grad():
        for x, y in loader:
            total += len(y)
            for name, model in models.items():
                logits = model.eval()(x)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hits1[name] += int((top[:, 0] == y).sum())
                hits5[name] += int((top == y[:, None]).any(dim=1).sum())
    out = {f"{name}_acc": 100.0 * hits1[name] / total for name in models}
    out.update({f"{name}_top5": 100.0 * hits5[name] / total for name in models})
    return out


def checkpoint_accuracies(path: Path, *, threads: int | None = None) -> dict[str, float]:
    """``count_accuracies`` of every network in a ``metapl train`` checkpoint on its run's test split.

    The models are rebuilt with ``create_model`` from the checkpoint's config, and the test split is read as the
    trainer reads it (``load_dataset`` with the run's seed, its ``eval_limit`` where the config has one,
    ``make_eval_loader`` with its batch size and the checkpoint's normalisation), not through
    ``metapl.commands.inference`` or ``metapl.training.evaluation``.

    Args:
        path: the ``.pt`` file.
        threads: torch CPU threads to count with (a run's own count keeps its logits bit for bit), then restored.

    Returns:
        ``count_accuracies``'s dict over the roles the checkpoint holds (teacher, student, ema).
    """
    import torch

    from metapl.data import ImageArrays, load_dataset, make_eval_loader
    from metapl.models import create_model

    ckpt = torch.load(path, weights_only=False)
    cfg = ckpt["config"]
    data = load_dataset(
        cfg["dataset"],
        cfg["data_dir"],
        image_size=cfg["image_size"],
        cache_dir=cfg["cache_dir"],
        seed=cfg["seed"],
    )
    test, limit = data.test, cfg.get("eval_limit")  # a run evaluated on the first N test images only: the same N
    if limit is not None:
        test = ImageArrays(test.images[:limit], test.labels[:limit])
    loader = make_eval_loader(test, mean=ckpt["mean"], std=ckpt["std"], batch_size=cfg["eval_batch_size"])
    shape = {key: int(ckpt[key]) for key in ("num_classes", "in_channels", "image_size")}
    models = {}
    for role in ("teacher", "student", "ema"):
        if ckpt.get(role) is not None:
            models[role] = create_model(cfg["teacher"] if role == "teacher" else cfg["student"], **shape)
            models[role].load_state_dict(ckpt[role])
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    try:
        return count_accuracies(models, loader)
    finally:
        torch.set_num_threads(saved_threads)


# -- the one-line CLI check and copies of a module's finished run (test_reliability, test_cluster) -----------------


def cli(capsys, *argv) -> tuple[int, str]:
    """Run ``metapl ARGV`` in this process; return the exit status and stderr, checked to be at most one line."""
    from metapl.commands.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture
def copy_of(base_run, tmp_path):
    """Copies of the requesting module's ``base_run`` (a finished run), for the tests that change one."""
    import shutil

    def make(name: str = "copy") -> Path:
        return Path(shutil.copytree(base_run, tmp_path / name))

    return make


REPO = Path(__file__).resolve().parents[1]


def benchmark_module(name: str):
    """The module ``benchmarks.NAME`` (the repository root is on pytest's path: pyproject.toml)."""
    return importlib.import_module(f"benchmarks.{name}")


def run_benchmark(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository root, as benchmarks/README.md documents it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
