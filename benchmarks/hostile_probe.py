"""A hostile probe of issue 20's library and command-line cases (bad batches, bad values, zero steps, ignored options,
corrupt shards, swapped IDX files). Not a test: it counts the clean cases, before and after a change.

A case is clean when it ends in one ``ValueError`` (library) or one ``metapl: error:`` line with exit 2 (command line),
or does the right thing; never a traceback, an error from inside torch, or non-finite weights left in a model.

    python -m benchmarks.hostile_probe [--no-cli]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.harness import data_path
from metapl.core import Batch, MPLConfig, MPLState, mpl_update
from metapl.training.optimizers import make_sgd

K = 4


def _models():
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, K))

    return make(), make()


def _batch(**change):
    g = torch.Generator().manual_seed(1)
    b = Batch(
        torch.randn(4, 3, 8, 8, generator=g),
        torch.randint(0, K, (4,), generator=g),
        torch.randn(8, 3, 8, 8, generator=g),
        torch.randn(8, 3, 8, 8, generator=g),
        torch.randint(0, K, (8,)),
    )
    return b._replace(**change)


def _update(batch, mode="hard", s_lr=0.1, t_lr=0.1, uda_weight=1.0, must_raise=True, **cfg):
    """Clean when a ValueError is raised and both models are unchanged (or, unless ``must_raise``, no error and all
    weights finite)."""
    teacher, student = _models()
    before = [copy.deepcopy(m.state_dict()) for m in (teacher, student)]
    sgd = dict(momentum=0.9, nesterov=False, weight_decay=0.0, device=torch.device("cpu"))
    t_opt, s_opt = make_sgd(teacher, lr=t_lr, **sgd), make_sgd(student, lr=s_lr, **sgd)
    try:
        mpl_update(
            teacher, student, t_opt, s_opt, batch, MPLConfig(mode=mode, **cfg), MPLState(), uda_weight=uda_weight
        )
    except ValueError as e:
        same = all(
            torch.equal(a, b)
            for m, s in zip((teacher, student), before)
            for a, b in zip(m.state_dict().values(), s.values())
        )
        return same, f"ValueError: {str(e)[:90]}" + ("" if same else " (models changed)")
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
    finite = all(
        torch.isfinite(p).all() for m in (teacher, student) for p in m.state_dict().values() if p.is_floating_point()
    )
    return finite and not must_raise, "no error" + ("" if finite else ", NON-FINITE weights")


def _nan(shape, at=0):
    x = torch.randn(shape)
    x.view(-1)[at] = float("nan")
    return x


def _raises(fn, kind=ValueError):
    try:
        fn()
    except kind as e:
        return True, f"{type(e).__name__}: {str(e)[:90]}"
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
    return False, "accepted"


def _cfg(**kw):
    from metapl.config.fields import TrainConfig

    return lambda: TrainConfig(**kw)


LIBRARY = {
    "hard: NaN in x_l": lambda: _update(_batch(x_l=_nan((4, 3, 8, 8)))),
    "hard: NaN in x_uw": lambda: _update(_batch(x_uw=_nan((8, 3, 8, 8)))),
    "hard: NaN in x_us": lambda: _update(_batch(x_us=_nan((8, 3, 8, 8)))),
    "soft: NaN in x_l": lambda: _update(_batch(x_l=_nan((4, 3, 8, 8))), mode="soft"),
    "soft: NaN in x_us": lambda: _update(_batch(x_us=_nan((8, 3, 8, 8))), mode="soft"),
    "uda_weight NaN": lambda: _update(_batch(), uda_weight=float("nan")),
    "uda_weight -1": lambda: _update(_batch(), uda_weight=-1.0),
    "student lr NaN": lambda: _update(_batch(), s_lr=float("nan")),
    "hard: huge lr -> inf": lambda: _update(_batch(), s_lr=1e38, t_lr=1e38, feedback="dot", must_raise=False),
    "hard: y_l = K": lambda: _update(_batch(y_l=torch.tensor([0, 1, 2, K]))),
    "soft: y_l = -1": lambda: _update(_batch(y_l=torch.tensor([0, 1, 2, -1])), mode="soft"),
    "hard dot: y_l = K": lambda: _update(_batch(y_l=torch.tensor([0, 1, 2, K])), feedback="dot", must_raise=False),
    "y_l shorter than x_l": lambda: _update(_batch(y_l=torch.tensor([0, 1, 2]))),
    "y_u wrong length": lambda: _update(_batch(y_u=torch.zeros(3, dtype=torch.long))),
    "x_l 10x10 vs x_u 8x8": lambda: _update(_batch(x_l=torch.randn(4, 3, 10, 10))),
    "y_l float": lambda: _update(_batch(y_l=torch.zeros(4))),
    "x_l uint8": lambda: _update(_batch(x_l=torch.zeros(4, 3, 8, 8, dtype=torch.uint8))),
    "x_l 3-D": lambda: _update(_batch(x_l=torch.randn(3, 8, 8))),
    "y_l 2-D": lambda: _update(_batch(y_l=torch.zeros(4, 1, dtype=torch.long))),
    "MPLState().load_state_dict({})": lambda: _raises(lambda: MPLState().load_state_dict({})),
    "TrainConfig(steps=-1) is a ValueError": lambda: _raises(_cfg(steps=-1)),
    "TrainConfig soft + feedback cosine": lambda: _raises(_cfg(mode="soft", feedback="cosine")),
    "TrainConfig soft + baseline_decay": lambda: _raises(_cfg(mode="soft", baseline_decay=0.01)),
    "TrainConfig soft + pseudo_label sample": lambda: _raises(_cfg(mode="soft", pseudo_label="sample")),
    "TrainConfig supervised + uda_weight 2": lambda: _raises(_cfg(method="supervised", uda_weight=2.0)),
    "TrainConfig supervised + feedback dot": lambda: _raises(_cfg(method="supervised", feedback="dot")),
    "MPLConfig soft + feedback cosine": lambda: _raises(lambda: MPLConfig(mode="soft", feedback="cosine")),
    "MPLConfig hard + soft_temperature 2": lambda: _raises(lambda: MPLConfig(soft_temperature=2.0)),
}


def _cli(args, tmp, env=None):
    cmd = [sys.executable, "-m", "metapl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env={**os.environ, **(env or {})}, timeout=600)


def _one_line(p):
    err = p.stderr.strip().splitlines()
    ok = p.returncode == 2 and len(err) == 1 and err[0].startswith("metapl: error:")
    return ok, f"exit {p.returncode}: {(err or [''])[-1][:110]}"


TINY = [
    "--dataset",
    "digits",
    "--num-labeled",
    "40",
    "--batch-size",
    "8",
    "--mu",
    "2",
    "--workers",
    "0",
    "--eval-every",
    "2",
    "--log-every",
    "2",
    "--save-every",
    "2",
    "--no-tensorboard",
    "--no-progress",
    "--device",
    "cpu",
    "--steps",
    "2",
    "--finetune-steps",
    "0",
    "--eval-limit",
    "40",
]


def _image_tree(root: Path, corrupt: bool) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / c / f"{i}.jpg")
    if corrupt:
        (root / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def cli_cases(tmp: Path) -> dict:
    """The command-line cases: name -> (clean, note)."""
    return {**_run_cases(tmp), **_shard_cases(tmp), **_fashion_cases(tmp)}


def _run_cases(tmp: Path) -> dict:
    out = {}
    p = _cli(["train", *TINY, "--out", "run"], tmp)
    p = _cli(["finetune", "run", "--steps", "0"], tmp)
    done = json.loads((tmp / "run" / "summary.json").read_text()).get("finetune_steps") if p.returncode == 0 else None
    out["finetune --steps 0"] = (done == 0, f"exit {p.returncode}: finetune_steps {done}")
    p = _cli(["demo", "--steps", "0", "--out", "demo"], tmp)
    out["demo --steps 0"] = (_one_line(p)[0] or (p.returncode == 0 and "500" not in p.stdout), _one_line(p)[1])
    out["train --mode soft --feedback cosine"] = _one_line(
        _cli(["train", *TINY, "--out", "r2", "--mode", "soft", "--feedback", "cosine"], tmp)
    )
    p = _cli(["train", *TINY, "--out", "r3", "--method", "supervised", "--uda-weight", "3"], tmp)
    out["train --method supervised --uda-weight 3"] = _one_line(p)
    return out


def _shard_cases(tmp: Path) -> dict:
    out = {}
    src = _image_tree(tmp / "tree", corrupt=True)
    p = _cli(["shards", str(src), "sh"], tmp)
    out["shards with a corrupt jpeg"] = (_one_line(p)[0] and "bad.jpg" in p.stderr, _one_line(p)[1])
    p = _cli(["shards", str(src), "sh2", "--skip-corrupt"], tmp)
    out["shards --skip-corrupt"] = (
        p.returncode == 0 and "bad.jpg" in p.stdout + p.stderr,
        f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:100]}",
    )
    # A shard with a corrupt image inside, written by the old packer: --skip-corrupt must let training go on.
    from metapl.data.sources.shard_writer import _write_shard

    (tmp / "bad_shards").mkdir()
    entries = [(f"{c}/{i}.jpg", n) for n, c in enumerate("ab") for i in range(6)] + [("a/bad.jpg", 0)]
    _write_shard(tmp / "bad_shards" / "train-000000.tar", src, entries, "train", 0)
    shard_args = ["--dataset", "shards", "--data-dir", "bad_shards", "--image-size", "16", "--num-labeled", "4"]
    rest = TINY[4:]
    p = _cli(["train", *shard_args, *rest, "--out", "r4", "--skip-corrupt", "--steps", "4"], tmp)
    out["train on a shard with a corrupt jpeg, --skip-corrupt"] = (
        p.returncode == 0,
        f"exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:100]}",
    )
    _write_shard(tmp / "test-000000.tar", src, entries[:-1], "test", 0)
    p = _cli(
        [
            "train",
            "--dataset",
            "shards",
            "--data-dir",
            "test-000000.tar",
            "--image-size",
            "16",
            "--num-labeled",
            "4",
            *rest,
            "--out",
            "r5",
        ],
        tmp,
    )
    out["a lone test-*.tar as --data-dir"] = _one_line(p)
    return out


def _fashion_cases(tmp: Path) -> dict:
    out = {}
    fashion = data_path("fashion-mnist")
    rest = TINY[4:]
    if fashion.is_dir():
        swapped = tmp / "fashion"
        swapped.mkdir()
        for f in fashion.glob("*.gz"):
            shutil.copy(f, swapped / f.name)
        shutil.copy(fashion / "train-labels-idx1-ubyte.gz", swapped / "train-images-idx3-ubyte.gz")
        cache = tmp / "cache"
        p = _cli(
            [
                "train",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(swapped),
                "--cache-dir",
                str(cache),
                *rest,
                "--out",
                "r6",
            ],
            tmp,
        )
        entries = [e for e in cache.rglob("*") if e.is_file()] if cache.exists() else []
        ok, note = _one_line(p)
        out["fashion: labels file as images file"] = (
            ok and not entries and "train-images" in p.stderr,
            note + f" ({len(entries)} cache files)",
        )
    return out


def main() -> None:
    results = {}
    for name, case in LIBRARY.items():
        results[name] = case()
    if "--no-cli" not in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            results.update(cli_cases(Path(tmp)))
    for name, (clean, note) in results.items():
        print(f"{'clean' if clean else 'DIRTY'}  {name:55s} {note}")
    print(f"clean: {sum(c for c, _ in results.values())} of {len(results)}")


if __name__ == "__main__":
    main()
