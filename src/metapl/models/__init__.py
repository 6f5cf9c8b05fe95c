"""Model zoo: one registry, ``create_model(name, ...)``, and the registered CIFAR-scale models.

Importing this package registers ``wrn28_2``, ``wrn28_8``, ``small_cnn`` and ``resnet18_cifar``.
"""

from metapl.models import small, wideresnet  # noqa: F401  (imported for their @register_model side effect)
from metapl.models.registry import count_parameters, create_model, list_models, register_model
from metapl.models.small import ResNet18Cifar, SmallCNN
from metapl.models.wideresnet import WideResNet

__all__ = [
    "ResNet18Cifar",
    "SmallCNN",
    "WideResNet",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
]
