import pytest

from tlese.cli import main
from tlese.models.cost import format_table, model_table

NAMES = ["mbv2_plain", "mobilenet_v2", "tlese_mbv2", "lite0_plain", "tlese_lite0"]


@pytest.fixture(scope="module")
def rows():
    return {row["model"]: row for row in model_table(NAMES, sizes=(224,), num_classes=4, in_chans=1)}


def test_our_mobilenet_v2_costs_what_torchvisions_does(rows):
    assert rows["mbv2_plain"]["params_M"] == rows["mobilenet_v2"]["params_M"]
    assert rows["mbv2_plain"]["GFLOPs@224"] == pytest.approx(rows["mobilenet_v2"]["GFLOPs@224"])
    assert rows["mbv2_plain"]["params_M"] == pytest.approx(2.2288, abs=1e-3)  # 2.2237 backbone + 4-class head


@pytest.mark.parametrize("tlese, plain", [("tlese_mbv2", "mbv2_plain"), ("tlese_lite0", "lite0_plain")])
def test_design_goals_of_the_default_models(rows, tlese, plain):
    assert rows[tlese]["params_M"] <= 4.0
    assert rows[tlese]["params_M"] / rows[plain]["params_M"] - 1 <= 0.10
    assert rows[tlese]["GFLOPs@224"] / rows[plain]["GFLOPs@224"] - 1 <= 0.05


def test_formats(rows):
    table = list(rows.values())
    md = format_table(table, "md").splitlines()
    assert md[0].startswith("| model | params_M") and len(md) == 2 + len(table)
    csv = format_table(table, "csv").splitlines()
    assert csv[0].startswith("model,params_M") and len(csv) == 1 + len(table)


def test_cli_prints_the_table(capsys):
    assert main(["models", "--filter", "tlese_lite0*", "--size", "64", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(",")[:4] == ["model", "params_M", "ese_added_%", "GFLOPs@64"]
    names = [line.split(",")[0] for line in lines[1:]]
    assert names == ["tlese_lite0", "tlese_lite0_ese_expanded", "tlese_lite0_ese_output"]


def test_cli_unknown_filter_is_an_error(capsys):
    assert main(["models", "--filter", "vgg*"]) == 2
    assert "valid:" in capsys.readouterr().err


@pytest.mark.parametrize("tlese, plain", [("tlese_mbv2", "mbv2_plain"), ("tlese_lite0_ese_expanded", "lite0_plain")])
def test_ese_parameter_count_is_what_the_gates_add(tlese, plain):
    import torch

    from tlese.models import create_model
    from tlese.models.cost import count_params, ese_parameter_count

    with torch.device("meta"):
        gated, base = create_model(tlese, 4), create_model(plain, 4)
    assert ese_parameter_count(base) == 0
    assert ese_parameter_count(gated) == count_params(gated) - count_params(base) > 0
