"""The run reader and the model spec born in training: each fold's record and checkpoint say what model it trained,
on which classes and images; a trained model is rebuilt from that record, whatever happened to the config since."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tlese.models.spec import CHECKPOINT_KEY, ModelSpec
from tlese.train.rundir import RunDir
from tlese.train.runs import FinishedRun
from tlese.train.trained import load_trained

pytestmark = pytest.mark.slow  # tiny_run trains (once per session)

ARM = "plain_scratch"  # tests/conftest.py: 3 folds, dual view, 32 px, lite0_plain from scratch


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the shared tiny run, free to edit."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_records_and_checkpoints_carry_the_spec_with_the_trained_preprocessing(tiny_run):
    from tlese.data.preprocess import PREPROCESS_VERSION, PreprocessParams
    from tlese.data.tasks import get_task

    run = FinishedRun(tiny_run)
    classes = list(get_task("synth_subtype4").classes)
    cache_dir = Path(run.experiment.cache_dir)
    for fold_dir in run.finished_folds(ARM):
        spec = ModelSpec.from_dict(fold_dir.record()["model_spec"])
        assert spec.registry_name == "lite0_plain" and spec.class_names == classes
        assert spec.create_kwargs == {"num_classes": 4, "in_chans": 1, "views": "dual", "fusion": "mean_logits"}
        params = PreprocessParams.from_dict(spec.preprocess)
        assert (params.size, params.modality) == (32, "mammo") and spec.input_shape == (2, 1, 32, 32)
        assert spec.preprocess_fingerprint == params.fingerprint() and spec.preprocess_version == PREPROCESS_VERSION
        # the images it trained on were prepared with exactly these parameters (the cache folder is named by them)
        assert json.loads((cache_dir / params.fingerprint() / "params.json").read_text())
        for checkpoint in ("best.ckpt", "last.ckpt"):
            saved = torch.load(fold_dir.checkpoints / checkpoint, map_location="cpu", weights_only=True)
            assert saved[CHECKPOINT_KEY] == fold_dir.record()["model_spec"]


def test_the_reader_answers_for_config_arms_specs_predictions_and_models(tiny_run):
    run = FinishedRun(tiny_run)
    assert [arm.name for arm in run.arms] == [ARM] and run.repeats == 1 and run.class_names[0] == "Luminal A"
    specs = run.model_specs(ARM)
    assert sorted(specs) == [0, 1, 2] and len({json.dumps(spec.to_dict()) for spec in specs.values()}) == 1
    results = run.predictions(ARM)
    assert results.unit == "breast" and results.missing_folds == []
    assert sorted(results.predictions["fold"].unique()) == [0, 1, 2]
    trained = run.trained(ARM, 1)
    assert trained.spec == specs[1] and not trained.model.training
    with torch.no_grad():
        assert trained.model(torch.rand(3, 2, 1, 32, 32)).shape == (3, 4)


def test_load_trained_rebuilds_from_the_record_even_after_the_config_is_edited(tiny_run, run_copy):
    before = load_trained(tiny_run, ARM, 0)
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["image_size"] = 64
    config["fusion"] = "concat"  # a head of another width: the trained weights would not even load into it
    config["arms"][0]["model"] = "tlese_lite0"  # another architecture under the same arm name
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert FinishedRun(run_copy).arm(ARM).model == "tlese_lite0" and FinishedRun(run_copy).experiment.image_size == 64

    after = load_trained(run_copy, ARM, 0)
    assert after.spec == before.spec and after.spec.registry_name == "lite0_plain" and after.spec.image_size == 32
    assert type(after.model) is type(before.model)
    x = torch.rand(2, 2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(after.model(x), before.model(x))


def test_a_fold_recorded_without_a_spec_says_to_retrain_it(run_copy):
    record_file = RunDir(run_copy).arm(ARM).fold(2).record_file
    record = json.loads(record_file.read_text())
    del record["model_spec"]
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"fold_info.json: made before fold records carried the model spec.*"
                                         r"--arm plain_scratch --fold 2 --no-resume"):
        load_trained(run_copy, ARM, 2)
    assert load_trained(run_copy, ARM, 1).spec.image_size == 32  # the other folds are untouched


def test_a_record_that_disagrees_with_its_checkpoint_is_refused(run_copy):
    record_file = RunDir(run_copy).arm(ARM).fold(0).record_file
    record = json.loads(record_file.read_text())
    record["model_spec"]["create_kwargs"]["fusion"] = "mean_features"  # same weights' shapes, another model
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="best.ckpt: holds another model"):
        load_trained(run_copy, ARM, 0)
