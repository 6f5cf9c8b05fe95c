"""Packaging and plugins: shipped configs by name, ``metapl --version``, and the user's own models (``--import``)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
import yaml

from metapl.commands.cli import main
from metapl.config.recipes import find_config, shipped_configs
from metapl.models import registry

SHIPPED = [
    "cifar100_10k",
    "cifar10_4k",
    "cifar10_cpu",
    "fashion_100_cpu",
    "fashion_100_strong_cpu",
    "imagenet_10pct",
    "svhn_1k",
]
QUICK = [
    *["--dataset", "digits", "--steps", "2", "--eval-every", "2", "--batch-size", "4", "--mu", "1"],
    *["--num-labeled", "20", "--workers", "0", "--no-tensorboard", "--no-progress", "--finetune-steps", "0"],
]


def test_shipped_configs_live_in_the_package_and_resolve_by_name(tmp_path, monkeypatch):
    assert list(shipped_configs()) == SHIPPED
    assert all(p.parent.name == "configs" and p.parent.parent.name == "metapl" for p in shipped_configs().values())
    assert find_config("cifar10_4k") == shipped_configs()["cifar10_4k"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("steps: 3\n")
    assert find_config("mine.yaml").name == "mine.yaml" and find_config("sub/x") == find_config("sub/x")
    (tmp_path / "cifar10_4k").write_text("steps: 3\n")  # a file of that name here wins over the shipped one
    assert find_config("cifar10_4k") == tmp_path.joinpath("cifar10_4k").relative_to(tmp_path)


def test_train_with_a_config_name_and_an_unknown_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "fashion_100_cpu", *QUICK, "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    shipped = yaml.safe_load(shipped_configs()["fashion_100_cpu"].read_text())
    assert saved["t_lr"] == shipped["t_lr"] and saved["randaug_m"] == shipped["randaug_m"]
    capsys.readouterr()
    assert main(["train", "--config", "cifar10_8k", "--out", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err == (
        f"metapl: error: unknown config 'cifar10_8k'; the shipped configs are {', '.join(SHIPPED)}, or pass a YAML "
        "file\n"
    )
    assert not (tmp_path / "other").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    try:
        expected = version("metapl")
    except PackageNotFoundError:
        expected = "(not installed: a source checkout)"
    assert capsys.readouterr().out == f"metapl {expected}\n"


PLUGIN = """
from metapl.models import SmallCNN, register_model


@register_model("plug_cnn")
def plug_cnn(*, num_classes, in_channels=3, dropout=0.0, **kwargs):
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A throwaway package ``plugpkg`` on sys.path whose ``plugpkg.models`` registers ``plug_cnn``."""
    pkg = tmp_path / "plugins" / "plugpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    yield "plugpkg.models"
    _forget_plugin()


def _forget_plugin() -> None:
    """As a new process would start: plug_cnn unknown, plugpkg not imported."""
    registry._REGISTRY.pop("plug_cnn", None)
    for name in ("plugpkg.models", "plugpkg"):
        sys.modules.pop(name, None)


def test_own_model_via_import_is_found_again_by_every_command(plugin, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK, "--teacher", "plug_cnn", "--student", "plug_cnn", "--out", str(out)]
    assert main([*argv, "--import", plugin]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["imports"] == plugin
    for command in (["eval", str(out)], ["export", str(out)], ["finetune", str(out), "--steps", "1"]):
        _forget_plugin()
        assert main(command) == 0, capsys.readouterr().err
    (exported,) = (out / "export").glob("*.json")  # the run's result model, whichever network that is
    assert json.loads(exported.read_text())["imports"] == plugin
    images = tmp_path / "imgs"
    images.mkdir()
    from test_inference import write_images

    write_images(images, 2)
    for model in (exported.with_suffix(""), out):  # teacher.safetensors.json describes teacher.safetensors
        _forget_plugin()
        assert main(["predict", str(model), str(images), "--output", str(tmp_path / "p.csv")]) == 0
    _forget_plugin()
    assert main(["train", "--resume", str(out)]) == 0  # finished: resume only rebuilds the run and stops


def test_a_module_that_does_not_import_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--import", "no_such_pkg_for_metapl.models", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "metapl: error: cannot import model module 'no_such_pkg_for_metapl.models' (ModuleNotFoundError: No module "
        "named 'no_such_pkg_for_metapl'); check --import and that the module is on PYTHONPATH (or installed)\n"
    )
    assert not out.exists()
