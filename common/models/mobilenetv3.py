"""MobileNetV3 (Howard et al. 2019) adapted to 32x32 CIFAR inputs.

Built with torchvision's `mobilenet_v3_small` / `mobilenet_v3_large` (``weights=None``; extra
kwargs such as ``width_mult``, ``dropout``, ``reduced_tail`` go to torchvision), then adapted:
the ImageNet networks reduce 224x224 by 32 to 7x7, which would leave 1x1 maps on CIFAR. Here

* the stem conv has stride `stem_stride` (default 1 instead of 2), and
* the first stride-2 inverted-residual block (small: block 1, large: block 2) gets stride
  `first_block_stride` (default 1; the block has no residual either way),

so the total stride is 8 and 32x32 inputs end as 4x4 maps, like the CIFAR ResNets; 16x16
inputs end as 2x2. Parameters are unchanged by strides: small 1.53M, large 4.21M at 10
classes (mostly the 1024/1280-wide classifier). torchvision's init is kept (Kaiming-normal
convs, BN 1/0, Linear normal(0, 0.01)).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small
from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3

from .registry import register_model

__all__ = ["adapt_mobilenetv3_to_cifar"]


def adapt_mobilenetv3_to_cifar(
    model: MobileNetV3, stem_stride: int = 1, first_block_stride: int = 1
) -> MobileNetV3:
    """Reduce the stem stride and the first downsampling block's stride, in place."""
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    stem.stride = (stem_stride, stem_stride)
    for block in model.features:
        if not isinstance(block, InvertedResidual):
            continue
        strided = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        if strided:
            for conv in strided:
                conv.stride = (first_block_stride, first_block_stride)
            block._is_cn = first_block_stride > 1  # torchvision's stage-boundary marker
            break
    return model


@register_model("cifar_mobilenetv3_small")
def cifar_mobilenetv3_small(
    num_classes: int = 10, stem_stride: int = 1, first_block_stride: int = 1, **kwargs: Any
) -> MobileNetV3:
    """MobileNetV3-Small, total stride 8 for 32x32 inputs: 1.53M params at 10 classes."""
    model = mobilenet_v3_small(weights=None, num_classes=num_classes, **kwargs)
    return adapt_mobilenetv3_to_cifar(model, stem_stride, first_block_stride)


@register_model("cifar_mobilenetv3_large")
def cifar_mobilenetv3_large(
    num_classes: int = 10, stem_stride: int = 1, first_block_stride: int = 1, **kwargs: Any
) -> MobileNetV3:
    """MobileNetV3-Large, total stride 8 for 32x32 inputs: 4.21M params at 10 classes."""
    model = mobilenet_v3_large(weights=None, num_classes=num_classes, **kwargs)
    return adapt_mobilenetv3_to_cifar(model, stem_stride, first_block_stride)
