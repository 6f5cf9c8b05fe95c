"""``metapl export``: safetensors / ONNX / TorchScript files computing what the run's model computes; checkpoints that
load with ``weights_only=True``; a slim ``finetuned.pt``; the run's result is what export takes by default."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from metapl.commands.cli import main
from metapl.commands.export import run_export
from metapl.commands.inference import run_predict
from metapl.errors import UserError
from metapl.rundir.checkpoint import RESUME_KEYS, load_checkpoint
from metapl.rundir.export_format import read_exported
from metapl.rundir.rebuild import build_model
from test_inference import write_fake_run, write_images

TRAIN = [
    *["train", "--dataset", "digits", "--steps", "2", "--eval-every", "1", "--batch-size", "4", "--mu", "1"],
    *["--num-labeled", "30", "--workers", "0", "--no-tensorboard", "--no-progress"],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step digits run with a validation split and 2 finetuning steps."""
    tmp = tmp_path_factory.mktemp("export")
    out = tmp / "run"
    argv = [*TRAIN, "--val-labeled", "10", "--finetune-steps", "2", "--out", str(out), "--cache-dir", str(tmp / "c")]
    assert main(argv) == 0
    return out


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(6, 1, 8, 8)).astype(np.float32))


def test_checkpoints_load_weights_only_and_finetuned_is_slim(run_dir):
    for name in ("checkpoint.pt", "finetuned.pt"):
        ckpt = torch.load(run_dir / name, map_location="cpu", weights_only=True)  # no pickled Python objects
        assert ckpt["step"] == 2 and ckpt["student"]
    assert not (run_dir / "best.pt").exists()  # one result per run, no best-of-time file beside it
    full = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(RESUME_KEYS) <= set(full)
    slim = torch.load(run_dir / "finetuned.pt", weights_only=True)
    assert not {"t_opt", "s_opt", "t_sched", "s_sched", "t_scaler", "s_scaler", "mpl_state", "rng"} & set(slim)
    assert {"config", "classes", "mean", "std", "image_size", "teacher", "student", "ema"} <= set(slim)


def test_old_checkpoint_with_a_numpy_rng_state_still_loads(tmp_path):
    # metapl 0.1 pickled np.random.get_state() (an ndarray): loaded with exactly NumPy's array types allowed.
    torch.save({"config": {}, "student": {}, "rng": {"numpy": np.random.get_state()}}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["rng"]["numpy"][1].dtype == np.uint32


@pytest.mark.parametrize("model", ["finetuned", "ema", "student", "teacher"])
def test_safetensors_export_matches_pytorch_and_predict_takes_it(run_dir, tmp_path, model):
    out = run_export(run_dir, model=model, output=tmp_path / f"{model}.safetensors")
    meta = json.loads((tmp_path / f"{model}.safetensors.json").read_text())
    source = run_dir / ("finetuned.pt" if model == "finetuned" else "checkpoint.pt")
    ckpt = load_checkpoint(source)
    assert meta["architecture"] == "small_cnn" and meta["arguments"] == {
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 8,
        "dropout": 0.0,
    }
    assert (meta["classes"], meta["mean"], meta["std"], meta["step"]) == (
        [str(c) for c in ckpt["classes"]],
        ckpt["mean"],
        ckpt["std"],
        2,
    )
    assert meta["source"] == str(source) and meta["role"] == model and meta["weights"] == out.name
    reference = build_model(ckpt, "student" if model == "finetuned" else model, source=source)
    rebuilt, _ = read_exported(out)
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), reference(x), atol=1e-5, rtol=0)
    images = tmp_path / "imgs"
    write_images(images, 3)
    from_export = run_predict(out, [images], output=tmp_path / "a.csv")
    from_run = run_predict(
        source,
        [images],
        model="student" if model == "finetuned" else model,
        output=tmp_path / "b.csv",
    )
    assert [r["top_k"] for r in from_export] == [r["top_k"] for r in from_run]


def test_default_export_is_the_runs_result_into_the_run_folder(run_dir, capsys):
    role = json.loads((run_dir / "summary.json").read_text())["result"]["role"]
    assert main(["export", str(run_dir)]) == 0
    assert (run_dir / "export" / f"{role}.safetensors").is_file()
    assert json.loads((run_dir / "export" / f"{role}.safetensors.json").read_text())["role"] == role
    assert "wrote " in capsys.readouterr().out


def test_onnx_export_matches_pytorch(run_dir, tmp_path):
    ort = pytest.importorskip(
        "onnxruntime", reason="ONNX Runtime is an optional test dependency (pip install onnxruntime)"
    )
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pip install onnx)")
    out = run_export(run_dir, model="ema", fmt="onnx", output=tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.json").is_file()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = build_model(load_checkpoint(run_dir / "checkpoint.pt"), "ema")
    x = _batch(1)  # a batch of 6 through a model traced with a batch of 1: the batch axis is dynamic
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - reference(x).numpy()).max() < 1e-5


def test_torchscript_export_matches_pytorch(run_dir, tmp_path):
    out = run_export(run_dir, model="student", fmt="torchscript", output=tmp_path / "m.torchscript.pt")
    assert (tmp_path / "m.torchscript.pt.json").is_file()
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated in torch 2.14, and still loads the file
        scripted = torch.jit.load(str(out))
    reference = build_model(load_checkpoint(run_dir / "checkpoint.pt"), "student")
    x = _batch(2)
    with torch.no_grad():
        assert torch.allclose(scripted(x), reference(x), atol=1e-5, rtol=0)


def test_export_refusals_write_nothing(tmp_path, capsys):
    write_fake_run(tmp_path / "run", ema=False)
    cases = [
        (["--model", "ema"], "has no EMA student (trained with --ema 0); pick --model student"),
        (["--model", "finetuned"], "no finetuned.pt beside"),
    ]
    for flags, message in cases:
        assert main(["export", str(tmp_path / "run"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("metapl: error: ") and message in err and err.count("\n") == 1
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["student"]["fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pt")
    assert main(["export", str(tmp_path / "run"), "--model", "student"]) == 2
    assert "non-finite (NaN/inf) student weights" in capsys.readouterr().err
    assert not (tmp_path / "run" / "export").exists()


def test_teacher_of_a_reduced_mpl_or_distill_run_is_refused(tmp_path):
    write_fake_run(tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["method"] = "reduced-mpl"  # as another engineer's method will write it
    with pytest.raises(UserError, match="is a --method reduced-mpl run: its teacher entry is not a small_cnn"):
        build_model(ckpt, "teacher", source=path)


def test_train_log_holds_what_the_terminal_showed(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TRAIN, "--finetune-steps", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert (out / "train.log").read_text() == shown and "summary: " in shown and shown.startswith("cpu: ")
    assert main(["train", "--resume", str(out)]) == 0  # a resumed run appends its lines
    assert (out / "train.log").read_text() == shown + capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0  # --overwrite removes the old log with the other run files
    assert (out / "train.log").read_text().startswith("cpu: ") and "--overwrite: removed " in capsys.readouterr().out


def test_onnx_without_the_onnx_package_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == (
        'metapl: error: --format onnx needs the onnx package; pip install "metapl[onnx]", or use --format safetensors\n'
    )
    assert list(tmp_path.iterdir()) == []


def test_predict_names_what_it_takes_for_anything_else(run_dir, tmp_path, capsys):
    images, _ = write_images(tmp_path / "imgs", 1)
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    cases = [
        (
            [str(not_a_model)],
            f"{not_a_model} is not a metapl checkpoint, nor an export with its notes.pt.json beside it; predict takes "
            "a run folder, a .pt checkpoint of metapl train, or a file of metapl export (.safetensors, .onnx or "
            ".torchscript.pt, its .json record beside it)",
        ),
        ([str(images[0])], f"{images[0]} is not a metapl checkpoint, nor an export with its img0.png.json beside it"),
    ]
    onnx = tmp_path / "bare.onnx"
    onnx.write_bytes(b"not read")  # an .onnx file without its record
    cases.append(([str(onnx)], f"no bare.onnx.json beside {onnx}; keep the JSON that metapl export wrote next to it"))
    exported = run_export(run_dir, model="ema", output=tmp_path / "e.safetensors")
    cases.append(
        ([str(exported), "--model", "student"], f"{exported} is an export: it holds one network; drop --model")
    )
    for args, message in cases:
        assert main(["predict", args[0], str(images[0]), *args[1:], "--output", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"metapl: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "p.csv").exists()


def test_predict_reads_a_version_1_record_and_onnx_needs_onnxruntime(run_dir, tmp_path, monkeypatch, capsys):
    images, _ = write_images(tmp_path / "imgs", 2)
    exported = run_export(run_dir, model="ema", output=tmp_path / "ema.safetensors")
    expected = run_predict(exported, images, output=tmp_path / "a.csv")
    (tmp_path / "ema.safetensors.json").rename(tmp_path / "ema.json")  # metapl 0.1's name, shared by the formats
    assert run_predict(exported, images, output=tmp_path / "b.csv") == expected
    pytest.importorskip("onnx", reason="torch.onnx.export needs the onnx package (pip install onnx)")
    onnx = run_export(run_dir, model="ema", fmt="onnx", output=tmp_path / "ema.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    assert main(["predict", str(onnx), str(images[0]), "--output", str(tmp_path / "c.csv")]) == 2
    assert capsys.readouterr().err == (
        f'metapl: error: {onnx} is an ONNX file: reading it needs onnxruntime; pip install "metapl[onnx]", or predict '
        "with the run folder or a .safetensors export\n"
    )
