"""The bundle card records the input properties seen in training (card["inputs"]); predict refuses an image whose
bit depth is outside the recorded set, and refuses nothing when the set is unknown."""

from __future__ import annotations

from types import SimpleNamespace

from tlese.bundle.format import load_bundle
from tlese.data.io import ImageHeader
from tlese.data.preprocess import PreprocessParams
from tlese.predict.pipeline import _bundle_problems
from tlese.train.release import _training_inputs


def _image(bits: int, source_format: str = "dicom") -> SimpleNamespace:
    return SimpleNamespace(header=ImageHeader(view="CC", side="L", modality="MG", photometric="MONOCHROME2",
                                              rows=1024, cols=1024, bits_stored=bits, source_format=source_format))


def _bundle(inputs: dict | None) -> SimpleNamespace:
    return SimpleNamespace(preprocess=PreprocessParams.build(64), card={} if inputs is None else {"inputs": inputs})


def test_card_records_the_training_bit_depths_and_formats(tiny_bundle):
    inputs = load_bundle(tiny_bundle).card["inputs"]
    # the synthetic training set: DICOM, one image in three 12-bit, the rest 16-bit, some MONOCHROME1
    assert inputs["bits_stored"] == [12, 16]
    assert inputs["source_formats"] == ["dicom"]
    assert set(inputs["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert inputs["files_read"] == inputs["files_total"] > 0


def test_predict_refuses_a_bit_depth_not_seen_in_training():
    bundle = _bundle({"bits_stored": [12, 16], "source_formats": ["dicom"]})
    assert _bundle_problems(bundle, _image(16)) == []
    assert _bundle_problems(bundle, _image(12)) == []
    assert _bundle_problems(bundle, _image(10)) == ["bit depth 10 not seen in training (trained on 12, 16)"]


def test_unknown_or_missing_training_inputs_refuse_nothing():
    unknown = {"bits_stored": "unknown", "photometric": "unknown", "source_formats": "unknown"}
    for bundle in (_bundle(unknown), _bundle(None)):
        assert _bundle_problems(bundle, _image(10, "png")) == []


def test_unreadable_training_table_is_recorded_as_unknown(tmp_path):
    experiment = SimpleNamespace(target=SimpleNamespace(adapter="no-such-adapter", root=str(tmp_path), options={}))
    inputs = _training_inputs(experiment)
    assert inputs["bits_stored"] == "unknown" and inputs["source_formats"] == "unknown"


def test_card_markdown_names_the_training_inputs(tiny_bundle):
    text = (tiny_bundle / "card.md").read_text()
    assert "Training inputs (predict refuses others): BitsStored [12, 16], formats ['dicom']" in text
