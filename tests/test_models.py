"""Model zoo: shapes, gradients, dropout, the registry's errors, torchvision and timm resolution."""

from __future__ import annotations

import inspect
import re
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from metapl.errors import UserError
from metapl.models import WideResNet, count_parameters, create_model, list_models, register_model, registry

REGISTERED = ["resnet18_cifar", "small_cnn", "wrn28_2", "wrn28_8"]


def test_list_models_has_the_zoo():
    assert list_models() == REGISTERED


@pytest.mark.parametrize("name", REGISTERED)
def test_rgb_32_gives_logits_and_train_mode(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    # The dry forward inside create_model switches to eval; it must hand the model back in train mode.
    assert model.training
    logits = model(torch.randn(2, 3, 32, 32))  # (B, C, H, W) -> (B, num_classes)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [28, 8])
@pytest.mark.parametrize("name", REGISTERED)
def test_grayscale_small_images(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1, image_size=size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, image_size=16)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 3]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", [*REGISTERED, "resnet18"])
def test_dropout_is_active_in_train_mode_only(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = create_model(name, num_classes=10, dropout=0.5)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    # Train-mode BatchNorm uses batch statistics, which are the same for the same batch: only dropout differs.
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_no_dropout_makes_train_mode_deterministic(name):
    # The counterpart of the test above: with dropout=0 nothing else is random in a train-mode forward.
    x = torch.randn(2, 3, 32, 32)
    model = create_model(name, num_classes=10, dropout=0.0)
    assert torch.equal(model(x), model(x))


def test_wrn_matches_the_recipe():
    model = create_model("wrn28_2", num_classes=10)
    # WRN-28-2 has 1.47M parameters in the FixMatch / MPL papers; a different block layout changes this count.
    assert count_parameters(model) == 1_467_610
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    assert torch.count_nonzero(model.fc.bias) == 0
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27)


def test_count_parameters_skips_frozen():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    assert count_parameters(model) == 3 * 2 + 2 + 1


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("tiny_linear")
    def tiny_linear(*, num_classes, in_channels, dropout, **kwargs):
        return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.LazyLinear(num_classes))

    assert create_model("tiny_linear", num_classes=4, image_size=8)(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ValueError, match="tiny_linear"):
        register_model("tiny_linear")(tiny_linear)
    with pytest.raises(ValueError, match="wrn28_2"):
        register_model("wrn28_2")(tiny_linear)
    with pytest.raises(ValueError, match="':'"):
        register_model("tv:mine")
    assert "tiny_linear" in list_models()


@pytest.mark.parametrize(
    ("name", "suggestion"), [("wrn28-2", "wrn28_2"), ("resnet_18", "resnet18"), ("smallcnn", "small_cnn")]
)
def test_unknown_name_suggests_close_matches(name, suggestion):
    with pytest.raises(UserError) as info:
        create_model(name, num_classes=10)
    message = str(info.value)
    assert message.startswith(f"unknown model {name!r}; did you mean ") and suggestion in message.split("?")[0]
    assert "use one of metapl's (small_cnn, resnet18_cifar, wrn28_2, wrn28_8; your own: register_model" in message
    # every torchvision classification model by name, and where timm's come from
    assert "(alexnet, convnext_base, " in message and ", wide_resnet50_2), or timm's as timm:NAME" in message
    assert "\n" not in message


def test_unknown_torchvision_prefix_is_a_user_error():
    with pytest.raises(UserError, match="tv:not_a_model"):
        create_model("tv:not_a_model", num_classes=10)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_torchvision_model_by_name(name):
    model = create_model(name, num_classes=10, in_channels=1, image_size=32)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_image_too_small_is_a_user_error():
    # AlexNet's stride-4 stem and three max-pools leave nothing of an 8×8 image; 64×64 is the first size it takes.
    with pytest.raises(UserError) as info:
        create_model("alexnet", num_classes=10, image_size=8)
    message = str(info.value)
    assert "'alexnet' cannot take images of size 8×8" in message
    assert "--image-size ≥ 64" in message
    assert "\n" not in message


def test_timm_prefix_without_timm_says_pip_install(monkeypatch):
    # A None entry in sys.modules makes `import timm` fail even where timm is installed.
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match="pip install timm"):
        create_model("timm:resnet18", num_classes=10)


def test_resnet50_comes_from_torchvision_and_trains_on_a_tiny_input():
    # The imagenet_10pct config names "resnet50": no registry entry, create_model builds torchvision's (weights=None).
    assert "resnet50" not in list_models()
    model = create_model("resnet50", num_classes=5, image_size=32)
    assert count_parameters(model) == 23_518_277  # torchvision's ResNet-50 with a 5-class head
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_factory_in_docs_usage_is_what_create_model_calls(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    text = (REPO / "docs" / "usage.md").read_text()
    section = text[text.index("**Your own models.**") :]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    parameters = inspect.signature(namespace["my_cnn"]).parameters
    keyword_only = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == ["num_classes", "in_channels", "dropout"]
    model = create_model("my_cnn", num_classes=3, in_channels=1, image_size=8, dropout=0.1)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3) and model[5].p == 0.1
