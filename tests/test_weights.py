"""Starting weights: ``--teacher-weights`` / ``--student-weights`` from a run, a checkpoint, a state dict or a
``.safetensors`` file, read weights-only; a head of another class count replaced; ``--pretrained`` through
torchvision's own loader and cache, offline."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

from conftest import count_accuracies
from metapl.commands.cli import main
from metapl.config.fields import TrainConfig
from metapl.data import load_dataset, make_eval_loader
from metapl.errors import UserError
from metapl.models import create_model
from metapl.models.weights import load_into
from metapl.training.starting_weights import read_weights, start_model

TINY = [
    *["--dataset", "digits", "--num-labeled", "30", "--batch-size", "8", "--mu", "2", "--workers", "0"],
    *["--threads", "1", "--eval-every", "15", "--no-tensorboard", "--no-progress", "--device", "cpu"],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short MPL run (teacher, student and EMA student), and its data."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *TINY, "--steps", "30", "--finetune-steps", "0", "--out", str(out)]) == 0
    data = load_dataset("digits", None, seed=0)
    return out, data


def _accuracy(model, data) -> float:
    loader = make_eval_loader(data.test, mean=data.mean, std=data.std, batch_size=512)
    return count_accuracies({"m": model}, loader)["m_acc"]


@pytest.mark.parametrize(
    "source, role", [("", None), (":ema", "ema"), (":student", "student"), (":teacher", "teacher")]
)
def test_a_run_loaded_as_a_teacher_scores_its_recorded_accuracy(trained, source, role):
    run, data = trained
    weights = str(run) if not source else str(run / "checkpoint.pt") + source
    cfg = TrainConfig(dataset="digits", teacher_weights=weights)
    teacher = start_model(cfg, "teacher", data)
    summary = json.loads((run / "summary.json").read_text())
    role = role or summary["result"]["role"]  # a run folder: the model it handed back
    assert _accuracy(teacher, data) == summary[f"{role}_acc"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_plain_state_dict_files_load_exactly(tmp_path, suffix):
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    path = tmp_path / f"w{suffix}"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DDP saves it
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    fresh = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    load_into(fresh, read_weights(str(path))[0], str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_head_of_another_class_count_is_replaced_and_said(tmp_path, log_lines):
    five = create_model("small_cnn", num_classes=5, in_channels=1, image_size=8)
    ten = create_model("small_cnn", num_classes=10, in_channels=1, image_size=8)
    head_before = ten.fc.weight.clone()
    load_into(ten, five.state_dict(), "five.pt")
    lines = log_lines()
    assert len(lines) == 1 and "the classifier head has 5 classes, the data 10" in lines[0]
    body = [k for k in five.state_dict() if five.state_dict()[k].shape == ten.state_dict()[k].shape]
    assert len(body) == len(five.state_dict()) - 2
    assert all(torch.equal(five.state_dict()[k], ten.state_dict()[k]) for k in body)
    assert torch.equal(ten.fc.weight, head_before)  # the model's own fresh head, untouched


def test_weights_of_another_architecture_are_one_line(tmp_path):
    path = tmp_path / "wrn.pt"
    torch.save(create_model("resnet18_cifar", num_classes=10, in_channels=1, image_size=8).state_dict(), path)
    with pytest.raises(UserError) as e:
        load_into(
            create_model("small_cnn", num_classes=10, in_channels=1, image_size=8),
            read_weights(str(path))[0],
            str(path),
        )
    assert "does not fit SmallCNN" in str(e.value) and "\n" not in str(e.value)


class Payload:  # a pickled object: code, not weights
    def __reduce__(self):
        return (print, ("executed",))


@pytest.mark.parametrize("content", [b"not a checkpoint", None], ids=["garbage", "pickled-code"])
def test_broken_or_unsafe_files_are_one_line_in_the_cli(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"w": Payload()}, path)
    else:
        path.write_bytes(content)
    assert main(["train", *TINY, "--steps", "2", "--teacher-weights", str(path), "--out", str(tmp_path / "x")]) == 2
    out, err = capsys.readouterr()
    assert "executed" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"metapl: error: cannot read weights from {path}")


def test_pretrained_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch, log_lines):
    # What torchvision downloads once with internet, placed in the cache by hand: no network is touched.
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    reference = torchvision.models.resnet18(num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    model = create_model("resnet18", num_classes=3, in_channels=1, image_size=32, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert torch.equal(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert model.fc.out_features == 3 and any("1000 classes, the data 3" in line for line in log_lines())


def test_missing_pretrained_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as e:
        create_model("resnet18", num_classes=3, image_size=32, pretrained=True)
    message = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-") in message and "\n" not in message
    with pytest.raises(UserError, match="metapl's own 'small_cnn' has no pretrained weights"):
        create_model("small_cnn", num_classes=3, pretrained=True)
