"""torchvision ImageNet sources, exercised offline with random weights saved under the real file names."""

import pytest
import torch
from torchvision import models as tvm

from tlese.models import create_model
from tlese.models.blocks import ese_state_keys
from tlese.models.weights import IMAGENET_MEAN, IMAGENET_STD

CASES = {  # model name -> (torchvision builder, weights enum member)
    "mobilenet_v2": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1),
    "mbv2_plain": (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1),  # our block code, mapped explicitly
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "densenet121": (tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1),
}


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch hub's cache, empty
    monkeypatch.delenv("TLESE_WEIGHTS_DIR", raising=False)


def _save_reference(name, folder):
    build, weights = CASES[name]
    torch.manual_seed(0)
    reference = build().eval()
    for m in reference.modules():  # non-trivial BN stats, so a wrong mapping shows in the logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / weights.url.rsplit("/", 1)[-1]
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.parametrize("name", sorted(CASES))
def test_imagenet_file_reproduces_torchvision(name, tmp_path):
    reference, path = _save_reference(name, tmp_path)
    model = create_model(name, 1000, in_chans=3, pretrained=path).eval()
    assert model.pretrained_cfg["load_summary"].startswith(f"loaded {len(reference.state_dict())} of")
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference((x - mean) / std), rtol=1e-4, atol=1e-4)


def test_weights_dir_env_and_grayscale_and_fresh_ese(tmp_path, monkeypatch):
    reference, _ = _save_reference("mobilenet_v2", tmp_path / "cache")
    monkeypatch.setenv("TLESE_WEIGHTS_DIR", str(tmp_path / "cache"))
    model = create_model("tlese_mbv2", 4, in_chans=1, pretrained=True)
    assert "MobileNet_V2_Weights.IMAGENET1K_V1" in model.pretrained_cfg["source"]
    folded = reference.features[0][0].weight.sum(1, keepdim=True)
    torch.testing.assert_close(model.backbone.stem.conv.weight, folded)
    # only the ESE gates and the 4-class head start fresh
    summary = model.pretrained_cfg["load_summary"]
    ese = len(ese_state_keys(model))
    assert f"skipped 2 by shape, excluded 0, new {ese}, unexpected 0" in summary
    # weights_dir= wins over the environment
    other = create_model("mbv2_plain", 4, pretrained=True, weights_dir=tmp_path / "cache")
    assert str(tmp_path / "cache") in other.pretrained_cfg["source"]


def test_missing_file_prints_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        create_model("resnet50", 4, pretrained=True, weights_dir=tmp_path)
    message = str(error.value)
    url = tvm.ResNet50_Weights.IMAGENET1K_V1.url
    assert f"curl --create-dirs -L -o {tmp_path / 'resnet50-0676ba61.pth'} {url}" in message
    assert "ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message


def test_wrong_file_is_refused_with_its_name(tmp_path):
    _, path = _save_reference("resnet50", tmp_path)
    with pytest.raises(ValueError, match="resnet50-0676ba61.pth.*do not fit"):
        create_model("mobilenet_v2", 4, pretrained=path)
