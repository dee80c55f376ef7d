"""Baselines: torchvision ResNet-50, DenseNet-121 and MobileNetV2 as backbones under the package contract.

The torchvision module itself is the backbone (its classifier replaced by Identity, so it returns pooled
features), which keeps its state-dict names under `backbone.` and makes the ImageNet map a pure prefix rule.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from tlese.models.registration import register_model
from tlese.models.weights import TorchvisionWeights, densenet_legacy_key


def _as_backbone(model: nn.Module, *, classifier: str, first_conv: str, gradcam_layer: str, in_chans: int) -> nn.Module:
    """Drop the classifier, swap the stem for `in_chans` inputs, attach the backbone attributes."""
    head = model.get_submodule(classifier)
    model.num_features = (head[-1] if isinstance(head, nn.Sequential) else head).in_features
    setattr(model, classifier, nn.Identity())
    if in_chans != 3:
        parent_name, _, attr = first_conv.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old: nn.Conv2d = getattr(parent, attr)
        new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        setattr(parent, attr, new)
    model.first_conv = first_conv
    model.gradcam_layer = gradcam_layer
    return model


@register_model(TorchvisionWeights(tvm.ResNet50_Weights.IMAGENET1K_V1, {"fc": "head", "": "backbone"}))
def resnet50(in_chans: int = 1) -> nn.Module:
    """ResNet-50 (torchvision), ImageNet weights IMAGENET1K_V1."""
    return _as_backbone(tvm.resnet50(), classifier="fc", first_conv="conv1", gradcam_layer="layer4", in_chans=in_chans)


@register_model(
    TorchvisionWeights(
        tvm.DenseNet121_Weights.IMAGENET1K_V1, {"classifier": "head", "": "backbone"}, rename=densenet_legacy_key
    )
)
def densenet121(in_chans: int = 1) -> nn.Module:
    """DenseNet-121 (torchvision), ImageNet weights IMAGENET1K_V1."""
    return _as_backbone(
        tvm.densenet121(), classifier="classifier", first_conv="features.conv0", gradcam_layer="features.norm5",
        in_chans=in_chans,
    )  # fmt: skip


@register_model(TorchvisionWeights(tvm.MobileNet_V2_Weights.IMAGENET1K_V1, {"classifier.1": "head", "": "backbone"}))
def mobilenet_v2(in_chans: int = 1) -> nn.Module:
    """MobileNetV2-1.0 (torchvision code), ImageNet weights IMAGENET1K_V1."""
    return _as_backbone(
        tvm.mobilenet_v2(), classifier="classifier", first_conv="features.0.0", gradcam_layer="features.18",
        in_chans=in_chans,
    )  # fmt: skip
