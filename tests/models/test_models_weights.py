import pytest
import torch
import torch.nn.functional as F

from tlese.models import create_model, load_partial
from tlese.models.blocks import ese_state_keys
from tlese.models.weights import adapt_input_conv, densenet_legacy_key, read_state_dict


def test_load_partial_reports_by_name():
    source = create_model("tlese_mbv2", 2, in_chans=1)
    target = create_model("tlese_mbv2_ese_output", 4, in_chans=3)
    state = source.state_dict()
    state["extra.weight"] = torch.zeros(1)
    report = load_partial(target, state)
    assert report.total == len(target.state_dict())
    assert "head.weight" in report.excluded and "extra.weight" in report.unexpected
    assert ("backbone.stem.conv.weight", (32, 1, 3, 3), (32, 3, 3, 3)) in report.skipped_shape
    assert set(report.missing) == ese_state_keys(target) - set(state) != set()  # gates the source lacks
    assert report.summary().startswith(f"loaded {len(report.loaded)} of {report.total} tensors (skipped 1 by shape")
    name = "backbone.blocks.0.dw.conv.weight"
    torch.testing.assert_close(target.state_dict()[name], state[name])
    assert "new backbone.blocks" in report.details()


def test_single_view_checkpoint_loads_into_dual_view_model(tmp_path):
    cxr = create_model("tlese_lite0", 3, in_chans=1)  # chest X-ray stage: 3 classes, single view
    path = tmp_path / "cxr.ckpt"
    # a Lightning-style checkpoint: {"state_dict": {"model.<name>": ...}, other stuff}
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in cxr.state_dict().items()}}, path)
    mammo = create_model("tlese_lite0", 4, in_chans=1, views="dual", fusion="concat")
    report = load_partial(mammo, path, strip_prefix="model.")
    assert not report.unexpected and not report.skipped_shape and not report.missing
    assert sorted(report.excluded) == ["head.bias", "head.weight"]
    assert len(report.loaded) == report.total - 2
    for name, tensor in cxr.backbone.state_dict().items():
        torch.testing.assert_close(mammo.backbone.state_dict()[name], tensor)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        read_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_state_dict(tmp_path / "nowhere.pth")


def test_folded_gray_stem_equals_rgb_stem_on_gray_images():
    weight = torch.randn(8, 3, 3, 3)
    gray = torch.rand(1, 1, 9, 9)
    torch.testing.assert_close(F.conv2d(gray, adapt_input_conv(weight, 1)), F.conv2d(gray.expand(1, 3, 9, 9), weight))


def test_fold_to_more_channels_keeps_the_scale():
    weight = torch.randn(8, 3, 3, 3)
    assert adapt_input_conv(weight, 5).shape == (8, 5, 3, 3)
    six = adapt_input_conv(weight, 6)  # RGB twice, each at half weight
    rgb = torch.rand(1, 3, 9, 9)
    torch.testing.assert_close(F.conv2d(rgb.repeat(1, 2, 1, 1), six), F.conv2d(rgb, weight))
    assert adapt_input_conv(weight, 3) is weight


def test_densenet_legacy_names_are_fixed():
    assert densenet_legacy_key("features.denseblock1.denselayer1.norm.1.weight") == (
        "features.denseblock1.denselayer1.norm1.weight"
    )
    assert densenet_legacy_key("features.norm5.weight") == "features.norm5.weight"


def test_tlese_checkpoint_as_pretrained_folds_its_stem(tmp_path):
    rgb = create_model("tlese_mbv2", 2, in_chans=3)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    gray = create_model("tlese_mbv2", 4, in_chans=1, pretrained=path)
    stem = rgb.backbone.stem.conv.weight.sum(1, keepdim=True)
    torch.testing.assert_close(gray.backbone.stem.conv.weight, stem)
    assert gray.pretrained_cfg["source"] == str(path)
    assert "skipped 2 by shape" in gray.pretrained_cfg["load_summary"]  # the 2-class head
