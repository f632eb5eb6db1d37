"""Model registry: CIFAR network families by name, torchvision models as ``tv_<name>``, timm
models as ``timm_<name>``.

    from common.models import build_model, model_widths
    model = build_model("cifar_resnet56", num_classes=100)
    pruned = build_model("cifar_vgg19", 10, widths=saved_widths, weights="pruned.safetensors")

Importing this package registers every family module below.
"""

from . import airnet, densenet, mobilenetv3, resnet, resnext, vgg, wrn  # noqa: F401  (register)
from .registry import build_model, check_model, list_models, load_weights, register_model
from .widths import apply_widths, init_module, model_widths

__all__ = [
    "apply_widths",
    "build_model",
    "check_model",
    "init_module",
    "list_models",
    "load_weights",
    "model_widths",
    "register_model",
]
