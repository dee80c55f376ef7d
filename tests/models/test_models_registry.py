import pytest
import torch

from tlese.models import create_model, list_models
from tlese.models.tlese_resnet import TLeseBackbone

EXPECTED = {
    "tlese_mbv2", "tlese_mbv2_ese_expanded", "tlese_mbv2_ese_output", "mbv2_plain",
    "tlese_lite0", "tlese_lite0_ese_expanded", "tlese_lite0_ese_output", "lite0_plain",
    "mobilenet_v2", "resnet50", "densenet121",
}  # fmt: skip


def test_registry_holds_the_model_family():
    assert EXPECTED <= set(list_models())
    assert list_models("tlese_lite0*") == ["tlese_lite0", "tlese_lite0_ese_expanded", "tlese_lite0_ese_output"]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'tlese_b7'.*resnet50"):
        create_model("tlese_b7", 4)


@pytest.mark.parametrize("kw, match", [({"views": "triple"}, "views"), ({"views": "dual", "fusion": "max"}, "fusion")])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        create_model("mbv2_plain", 4, **kw)


def test_contract_attributes():
    model = create_model("tlese_mbv2", 4, in_chans=1)
    assert model.num_features == 1280 and model.head.out_features == 4
    assert model.pretrained_cfg["mean"] == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert model.pretrained_cfg["source"] is None
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 1
    keys = model.state_dict().keys()
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert "mean" not in keys  # normalisation buffers are not persistent: checkpoints load across channel counts
    assert isinstance(model.backbone, TLeseBackbone)
    assert all(stage.ese == "output" and stage.ese_last_only for stage in model.backbone.arch.stages)  # the default
    lite = create_model("tlese_lite0", 2, in_chans=3)
    assert lite.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_input_range_check_is_loud_and_switchable():
    model = create_model("mbv2_plain", 3).eval()
    with pytest.raises(ValueError, match=r"min -0\.5.*max 255"):
        model(torch.tensor([-0.5, 255.0]).repeat(32 * 16).view(1, 1, 32, 32))
    model(torch.full((1, 1, 32, 32), 1.01))  # small overshoot (resampling) is tolerated
    model.check_input = False
    assert model(torch.full((1, 1, 32, 32), 255.0)).shape == (1, 3)


def test_shape_errors_name_the_expected_layout():
    single = create_model("mbv2_plain", 3, in_chans=1)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        single(torch.rand(1, 3, 32, 32))
    dual = create_model("mbv2_plain", 3, views="dual")
    with pytest.raises(ValueError, match="CC"):
        dual(torch.rand(1, 1, 32, 32))
