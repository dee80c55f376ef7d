"""Every registered model: forward + backward at tiny size, 1 and 3 channels, single and dual view."""

import pytest
import torch

from tlese.models import create_model, list_models
from tlese.models.dual_view import FUSIONS

SIZE = 64
# Inverted residual nets need 64 px: at 32 px their last stages are 1x1, where a train-mode BN cancels the bias of
# the BN before it exactly (a per-channel shift), so those biases get a zero gradient. Pre-activation nets don't.
SIZE_BY_MODEL = {"resnet50": 32, "densenet121": 32}


@pytest.mark.parametrize("views", ["single", "dual"])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_parameter_learns(name, in_chans, views):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=in_chans, views=views).train()
    size = SIZE_BY_MODEL.get(name, SIZE)
    # two images through the backbone either way: two single views, or one breast's CC + MLO
    shape = (2, in_chans, size, size) if views == "single" else (1, 2, in_chans, size, size)
    logits = model(torch.rand(shape))
    assert logits.shape == (shape[0], 3)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2][: shape[0]])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reached {dead[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_fusions(fusion):
    torch.manual_seed(0)
    model = create_model("mbv2_plain", 4, views="dual", fusion=fusion)
    assert model.head.in_features == FUSIONS[fusion].head_width * model.num_features
    x = torch.rand(3, 2, 1, SIZE, SIZE)
    _calibrate_batchnorm(model, x)  # random-init running stats squash eval-mode features to ~0
    model.eval()
    with torch.no_grad():
        out = model(x)
        per_view = model.forward_views(x)
        single = torch.stack([model.forward_features(x[:, v]) for v in range(2)], dim=1)
    assert out.shape == (3, 4)
    torch.testing.assert_close(per_view, single)  # the shared backbone sees each view exactly as alone
    if fusion == "mean_logits":
        torch.testing.assert_close(out, model.head(single).mean(1))
    swapped = model(x.flip(1))
    if fusion == "concat":  # order matters: CC features first
        assert not torch.allclose(out, swapped)
    else:
        torch.testing.assert_close(out, swapped)


@pytest.mark.parametrize("name", ["tlese_lite0", "resnet50", "densenet121", "mobilenet_v2"])
@pytest.mark.parametrize("views", ["single", "dual"])
def test_gradcam_layer_gives_spatial_activations(name, views):
    model = create_model(name, 2, views=views).eval()
    seen = []
    model.get_submodule(model.gradcam_layer).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.rand(2, 1, 64, 64) if views == "single" else torch.rand(2, 2, 1, 64, 64)
    with torch.no_grad():
        model(x)
    assert len(seen) == 1 and len(seen[0]) == 4
    assert seen[0][0] == (2 if views == "single" else 4)  # dual: one pass over B * 2 images


def _calibrate_batchnorm(model, x):
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one pass sets the running stats to the batch stats
    with torch.no_grad():
        model.train()(x)
