"""Grad-CAM: a known answer on a hand-built model, then shapes and side effects on the registered models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from tlese.evaluate.explain import find_layer, grad_cam, save_overlay
from tlese.models import create_model


class SpotDetector(nn.Module):
    """Feature map = input brightness pooled 4x4; class 1 = "bright", class 0 = "dark": the answer is known."""

    gradcam_layer = "features.1"

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(conv.weight)
        self.features = nn.Sequential(conv, nn.AvgPool2d(4))
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class DualSpotDetector(SpotDetector):
    """The same evidence rule over (B, 2, 1, H, W): both views through one backbone as B * 2 images, as the
    registry's dual-view models do (`x.flatten(0, 1)`), scores averaged over the views."""

    def forward(self, x):
        features = self.features(x.flatten(0, 1)).mean(dim=(1, 2, 3)).view(x.shape[0], x.shape[1])
        return self.head(features.mean(dim=1, keepdim=True))


def spot_image(row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, 64, 64)
    image[..., row:row + 6, col:col + 6] = 1.0
    return image


def test_map_peaks_on_the_evidence_and_is_empty_for_the_opposing_class():
    model = SpotDetector()
    images = torch.cat([spot_image(10, 40), spot_image(44, 8)])
    maps, logits = grad_cam(model, images, class_index=1)
    assert maps.shape == (2, 64, 64) and logits.shape == (2, 2)
    for index, (row, col) in enumerate([(13, 43), (47, 11)]):  # spot centres
        peak_row, peak_col = divmod(int(maps[index].argmax()), 64)
        assert abs(peak_row - row) <= 4 and abs(peak_col - col) <= 4
        assert maps[index].max() == pytest.approx(1.0)
        assert maps[index, :, :].mean() < 0.1  # most of the image carries no evidence
    against, _ = grad_cam(model, images, class_index=0)
    assert torch.count_nonzero(against) == 0  # brightness only argues against "dark": ReLU leaves nothing


def test_dual_view_maps_follow_the_view_order_and_share_one_scale():
    blank = torch.zeros(1, 1, 64, 64)
    breasts = torch.stack([torch.cat([blank, spot_image(10, 40)]),  # breast 0: spot in MLO only
                           torch.cat([spot_image(44, 8), blank])])  # breast 1: spot in CC only
    maps, _ = grad_cam(DualSpotDetector(), breasts, class_index=1)
    assert maps.shape == (2, 2, 64, 64)
    assert torch.count_nonzero(maps[0, 0]) == 0 and maps[0, 1].max() == pytest.approx(1.0)
    assert torch.count_nonzero(maps[1, 1]) == 0 and maps[1, 0].max() == pytest.approx(1.0)
    assert divmod(int(maps[0, 1].argmax()), 64)[0] in range(9, 18)  # near the MLO spot (rows 10-15)
    half = torch.stack([torch.cat([spot_image(10, 40) * 0.5, spot_image(10, 40)])])
    maps, _ = grad_cam(DualSpotDetector(), half, class_index=1)
    assert maps[0, 0].max() == pytest.approx(0.5, abs=0.02)  # the fainter view stays fainter


@pytest.mark.parametrize("views", ["single", "dual"])
def test_registered_model_maps_per_view_with_no_side_effects(views):
    torch.manual_seed(0)
    model = create_model("tlese_lite0", num_classes=4, in_chans=1, pretrained=False, views=views)
    model.train()
    shape = (3, 1, 64, 64) if views == "single" else (3, 2, 1, 64, 64)
    images = torch.rand(shape)
    maps, logits = grad_cam(model, images)
    assert maps.shape == ((3, 64, 64) if views == "single" else (3, 2, 64, 64))
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert torch.equal(logits.argmax(1), model.eval()(images).argmax(1))
    model.train()
    grad_cam(model, images)
    assert model.training  # mode restored
    assert all(param.grad is None for param in model.parameters())  # no gradients left behind


def test_baseline_layers_resolve():
    for name in ("resnet50", "densenet121", "mobilenet_v2"):
        model = create_model(name, num_classes=2, in_chans=1, pretrained=False)
        find_layer(model, model.gradcam_layer)  # raises if the declared layer does not exist


def test_bad_layer_and_class_are_named():
    model = SpotDetector()
    with pytest.raises(ValueError, match="no layer named 'features.9'.*top-level modules: \\['features', 'head'\\]"):
        grad_cam(model, spot_image(0, 0), layer="features.9")
    with pytest.raises(ValueError, match="must output a \\(N, C, h, w\\) feature map"):
        grad_cam(model, spot_image(0, 0), layer="head")
    with pytest.raises(ValueError, match="class_index must be in \\[0, 1\\]"):
        grad_cam(model, spot_image(0, 0), class_index=2)


def test_overlay_png(tmp_path):
    maps, _ = grad_cam(SpotDetector(), spot_image(20, 20), class_index=1)
    path = save_overlay(spot_image(20, 20)[0, 0].numpy(), maps[0].numpy(), tmp_path / "cam" / "overlay.png", title="x")
    with Image.open(path) as written:
        assert written.size[0] > written.size[1] > 100
    with pytest.raises(ValueError, match=r"must have the same \(H, W\) or \(V, H, W\) shape"):
        save_overlay(maps[0].numpy(), maps[0, :10].numpy(), tmp_path / "bad.png")
