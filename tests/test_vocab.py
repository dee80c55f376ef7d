"""The one vocabulary: how sides and views are spelled, parsed and grouped, and that no other module has its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tlese.vocab import (
    CMMD_SUBTYPES,
    MODALITIES,
    OTHER_VIEWS,
    SINGLE_VIEW_POLICIES,
    VIEW_FAMILIES,
    Side,
    View,
    is_cc,
    is_left,
    is_mlo,
    is_right,
    side_and_view_in_text,
    side_code,
    view_code,
    view_family,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "tlese"


@pytest.mark.parametrize(("text", "side"), [
    ("L", Side.L), ("l", Side.L), (" left ", Side.L), ("LEFT", Side.L), ("Left", Side.L), (Side.L, Side.L),
    ("R", Side.R), ("r", Side.R), ("RIGHT", Side.R), ("right\n", Side.R), (Side.R, Side.R),
    ("B", None), ("U", None),  # DICOM ImageLaterality: both / unpaired
    ("", None), ("   ", None), (None, None), (float("nan"), None), ("nan", None),
    ("junk", None), ("LR", None), ("lefty", None), (1, None),
])
def test_side_parse(text, side):
    assert Side.parse(text) is side
    assert side_code(text) == (side.value if side else None)


@pytest.mark.parametrize("missing", [None, float("nan"), "", "  ", "nan", "NaN", "None"])
def test_strict_side_parse_gives_none_only_for_missing_values(missing):
    assert Side.parse(missing, strict=True) is None


@pytest.mark.parametrize("junk", ["up", "B", "LR", 3])
def test_strict_side_parse_rejects_junk(junk):
    with pytest.raises(ValueError, match="side must be L, R or missing"):
        Side.parse(junk, strict=True)


@pytest.mark.parametrize(("text", "view"), [
    ("CC", View.CC), ("cc", View.CC), (" Cc ", View.CC), ("CRANIO-CAUDAL", View.CC), ("cranio-caudal", View.CC),
    ("CRANIOCAUDAL", View.CC), (View.CC, View.CC),
    ("MLO", View.MLO), ("mlo", View.MLO), ("MEDIO-LATERAL OBLIQUE", View.MLO), ("mediolateral oblique", View.MLO),
    (View.MLO, View.MLO),
    ("XCCL", None), ("ML", None), ("LMO", None),  # other views: codes (view_code), not tasks' views
    ("", None), ("  ", None), (None, None), (float("nan"), None), ("axial", None), ("CCC", None), ("PA", None),
])
def test_view_parse(text, view):
    assert View.parse(text) is view


@pytest.mark.parametrize(("text", "code"), [
    ("cc", "CC"), ("xccl", "XCCL"), ("XCCM", "XCCM"), ("LAT", "ML"), ("lateral", None), ("medio-lateral", "ML"),
    ("cranio-caudal exaggerated laterally", "XCCL"), ("latero-medial oblique", "LMO"), ("cleavage", "CV"),
    ("ISO", "ISO"), ("at", "AT"), ("", None), (None, None), ("junk", None),
])
def test_view_code_keeps_other_views_as_written(text, code):
    assert view_code(text) == code


def test_view_families():
    assert view_family("XCCL") == view_family("xccm") == view_family("FB") == view_family("CV") == "CC"
    assert view_family("LMO") == "MLO" and view_family("ML") == "ML" and view_family(None) is None
    assert view_family(View.MLO) == "MLO" and view_family("PA") == "PA"  # unknown codes unchanged
    assert set(VIEW_FAMILIES) == {"CC", "MLO"} | OTHER_VIEWS
    assert all(family in VIEW_FAMILIES for family in VIEW_FAMILIES.values())


@pytest.mark.parametrize(("text", "side", "view"), [
    ("L CC", "L", "CC"), ("RIGHT MLO", "R", "MLO"), ("R-MLO", "R", "MLO"), ("LCC", "L", "CC"), ("rmlo", "R", "MLO"),
    ("look AT this", None, None), ("XCCL left", "L", "XCCL"), ("", None, None), (None, None, None),
])
def test_side_and_view_in_text(text, side, view):
    assert side_and_view_in_text(text) == (side, view)


def test_predicates_take_any_spelling():
    assert is_left("left") and is_left(Side.L) and not is_left("R") and not is_left(None)
    assert is_right(" RIGHT") and not is_right("junk")
    assert is_cc("cranio-caudal") and is_cc("XCCL") and not is_cc("MLO") and not is_cc(None)
    assert is_mlo("mlo") and is_mlo("LMO") and not is_mlo("ML")


def test_members_are_their_codes():
    assert str(Side.L) == f"{Side.L}" == "L" and str(View.MLO) == "MLO"
    assert Side.R == "R" and {"R": 1}[Side.R] == 1
    assert [side.value for side in Side] == ["L", "R"] and [view.value for view in View] == ["CC", "MLO"]


def test_constants_have_one_home():
    from tlese.data import loader, tasks
    from tlese.data.datasets import _common, cmmd
    from tlese.data.preprocess import PreprocessParams

    assert MODALITIES == ("mammo", "cxr") and SINGLE_VIEW_POLICIES == ("duplicate", "drop")
    assert loader.SINGLE_VIEW_POLICIES is tasks.SINGLE_VIEW_POLICIES is SINGLE_VIEW_POLICIES
    assert tasks.MODALITIES is _common.MODALITIES is MODALITIES
    assert tasks.get_task("cmmd_subtype4").classes == tasks.get_task("synth_subtype4").classes == CMMD_SUBTYPES
    assert [cmmd.normalise_subtype(name.upper()) for name in CMMD_SUBTYPES] == list(CMMD_SUBTYPES)
    with pytest.raises(ValueError, match=r"modality must be one of \('mammo', 'cxr'\)"):
        PreprocessParams.build(64, "ct")


# Spellings only a parser needs: a module holding them (or one of the removed helpers) parses sides or views itself.
OWN_PARSING = [
    r"""["']LEFT["']""", r"""["']RIGHT["']""", r"""["']CRANIOCAUDAL["']""", r"""["']XCCL["']""",
    r"mediolateraloblique", r"\bnormali[sz]e_(side|view)\b", r"\b_side_value\b", r"\b_parse_description\b",
    r"\b_(SIDE|VIEW)_(WORDS|ALIASES|MEANINGS)\b", r"\bOTHER_MAMMO_VIEWS\b", r"\bVIEW_FAMILY\b",
]
# Constants with one home in tlese.vocab: a module assigning them (or spelling the subtypes out) has a copy.
OWN_CONSTANTS = [
    r"^\s*MODALITIES\s*[:=]", r"^\s*SINGLE_VIEW_POLICIES\s*[:=]", r"^\s*(CMMD_)?SUBTYPES4?\s*[:=]",
    r"""["']Luminal A["'],\s*["']Luminal B["']""",
]


def test_no_other_module_parses_sides_or_views_or_copies_the_constants():
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "vocab.py" and path.parent == SRC:
            continue
        text = path.read_text()
        for pattern in OWN_PARSING + OWN_CONSTANTS:
            for match in re.finditer(pattern, text, flags=re.MULTILINE):
                line = text.count("\n", 0, match.start()) + 1
                offending.append(f"{path.relative_to(SRC)}:{line}: {match.group(0).strip()}")
    assert not offending, offending
