"""Experiment YAML: validation names the key, overrides apply, relative paths resolve against the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tlese.train.commands import demo_config_path
from tlese.train.config import ConfigError, load_experiment, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal() -> dict:
    return {"target": {"adapter": "mias", "root": "data", "task": "mias_density"},
            "arms": [{"name": "a", "model": "tlese_lite0", "transfer": "imagenet"}]}


def test_relative_paths_resolve_against_the_file(tmp_path):
    experiment = load_experiment(_write(tmp_path, _minimal()))
    assert Path(experiment.target.root) == (tmp_path / "data").resolve()


def test_unknown_key_is_named_with_the_valid_ones(tmp_path):
    data = _minimal()
    data["target_recipe"] = {"epoch": 3}
    with pytest.raises(ConfigError, match=r"target_recipe: unknown key\(s\) \['epoch'\].*epochs"):
        load_experiment(_write(tmp_path, data))


def test_wrong_type_and_bad_choice_fail(tmp_path):
    data = _minimal()
    data["target_recipe"] = {"epochs": "many"}
    with pytest.raises(ConfigError, match="target_recipe.epochs"):
        load_experiment(_write(tmp_path, data))
    data = _minimal()
    data["arms"][0]["transfer"] = "triple"
    with pytest.raises(ConfigError, match=r"arms\[0\].transfer: 'triple' is not one of"):
        load_experiment(_write(tmp_path, data))


def test_double_transfer_needs_cxr_data(tmp_path):
    data = _minimal()
    data["arms"][0]["transfer"] = "double"
    with pytest.raises(ConfigError, match="cxr: adapter, root and task are required"):
        load_experiment(_write(tmp_path, data))


def test_overrides_are_typed_and_nested(tmp_path):
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x"]) == {"a": {"b": 3}, "c": [1, 2], "d": "x"}
    experiment = load_experiment(_write(tmp_path, _minimal()), ["target_recipe.epochs=2", "target_recipe.lr=0.01"])
    assert experiment.target_recipe.epochs == 2 and experiment.target_recipe.lr == pytest.approx(0.01)


@pytest.mark.parametrize("path", [demo_config_path(), *sorted((REPO / "configs").glob("*.yaml"))], ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    overrides = ["target.root=x", "cxr.root=y"] if path == demo_config_path() else []
    experiment = load_experiment(path, overrides)
    assert experiment.arms


def test_shipped_arm_names_claim_no_start_they_may_not_get():
    """An arm called *_double or *_imagenet must get ImageNet or fail; *_cxr must not load ImageNet; and so on."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    files = [*sorted((root / "configs").glob("*.yaml")), root / "src" / "tlese" / "configs" / "demo.yaml"]
    for path in files:
        for arm in yaml.safe_load(path.read_text()).get("arms", []):
            name, transfer = arm["name"], arm.get("transfer", "double")
            suffix = name.rsplit("_", 1)[-1]
            if suffix in ("scratch", "imagenet", "cxr", "double"):
                assert suffix == transfer, f"{path.name}: arm {name} has transfer {transfer}"
            if arm.get("missing_weights") == "scratch":
                assert suffix not in ("imagenet", "double"), f"{path.name}: {name} may start without ImageNet"
