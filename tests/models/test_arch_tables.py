"""ESE placement is data on the architecture table: every registered model is unchanged by that refactor, and a new
placement is one registration in one file (the worked example of docs/architecture.md, run from a temp file)."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tlese.models import create_model, list_models, load_partial
from tlese.models.blocks import EffectiveSE, ese_modules
from tlese.models.registration import REGISTRY
from tlese.models.tlese_resnet import LITE0, MBV2_1_0, Stage

# Recorded from the code before ESE placement moved onto the tables (num_classes 3, in_chans 1, seed 0).
RECORDED = json.loads((Path(__file__).parent / "data" / "registered_models.json").read_text())


def _state_signature(model: torch.nn.Module) -> str:
    items = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def test_every_registered_model_is_recorded():
    assert set(RECORDED) <= set(list_models())


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_registered_model_keeps_its_state_dict_parameters_and_outputs(name):
    recorded = RECORDED[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1).eval()
    assert _state_signature(model) == recorded["state_dict_sha256"]
    assert len(model.state_dict()) == recorded["tensors"]
    assert sum(p.numel() for p in model.parameters()) == recorded["params"]
    with torch.no_grad():
        logits = model(torch.linspace(0, 1, 64 * 64).view(1, 1, 64, 64))[0]
    torch.testing.assert_close(logits, torch.tensor(recorded["seed0_logits"]), atol=1e-5, rtol=0)


def test_stage_rows_say_which_blocks_are_gated():
    stage = Stage(6, 24, 3, 2, ese="output", ese_last_only=True)
    assert [stage.block_ese(i) for i in range(3)] == ["none", "none", "output"]
    assert [Stage(6, 24, 2, 2, ese="expanded").block_ese(i) for i in range(2)] == ["expanded", "expanded"]
    with pytest.raises(ValueError, match="unknown ESE placement 'middle'; valid: none, expanded, output"):
        Stage(6, 24, 2, 2, ese="middle")
    late = MBV2_1_0.with_ese("output", stages=(5, 6))
    assert [s.ese for s in late.stages] == ["none"] * 5 + ["output"] * 2
    assert LITE0.with_ese("expanded").stages[0].ese == "expanded" and LITE0.stages[0].ese == "none"  # a new table
    with pytest.raises(ValueError, match="out of range: the table has 7 stages"):
        MBV2_1_0.with_ese("output", stages=(7,))


DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _worked_example() -> str:
    """The Python block of docs/architecture.md's "A TLese variant with ESE elsewhere" (so doc and test agree)."""
    section = DOCS.read_text().split("**A TLese variant with ESE elsewhere.**")[1]
    return section.split("```python\n")[1].split("```")[0]


def test_a_variant_with_a_new_ese_placement_is_one_file(tmp_path):
    path = tmp_path / "my_variant.py"
    path.write_text(_worked_example())
    spec = importlib.util.spec_from_file_location("my_variant", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        _check_the_late_variant()
    finally:
        REGISTRY.pop("tlese_mbv2_ese_late")  # the temporary model leaves with the test


def _check_the_late_variant():
    assert "tlese_mbv2_ese_late" in list_models("tlese_mbv2*")
    model = create_model("tlese_mbv2_ese_late", num_classes=4, views="dual")
    gated = sorted({name.split(".")[2] for name, _ in ese_modules(model)}, key=int)
    assert gated == ["13", "14", "15", "16"]  # stage 5 (blocks 13-15) and stage 6 (block 16) of MobileNetV2
    assert all(isinstance(m, EffectiveSE) and m.fc.in_channels in (160, 320) for _, m in ese_modules(model))
    assert model(torch.rand(1, 2, 1, 64, 64)).shape == (1, 4)
    # every non-ESE tensor of the plain network (so its ImageNet map) loads by name
    report = load_partial(model, create_model("mbv2_plain", 4).state_dict(), exclude_prefixes=())
    assert not report.unexpected and not report.skipped_shape
    assert {key.split(".")[3] for key in report.missing} == {"ese"}


def test_the_temporary_variant_left_the_registry():
    assert "tlese_mbv2_ese_late" not in list_models()
