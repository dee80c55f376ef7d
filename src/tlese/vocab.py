"""Shared vocabulary: the one place that knows how sides, views, modalities and a few fixed label sets are written.

- `Side` (L, R) and `View` (CC, MLO), each with `parse(text)`: every spelling the data layer meets (table values,
  DICOM tags, DICOM code meanings) in, the member or None out. Callers never compare against "LEFT" or "CC" text.
- `side_code(text)`: 'L' / 'R' / None, the code a table stores.
- `view_code(text)`: any mammographic view code (CC, MLO, and the views no task uses yet: ML, LM, LMO, XCCL,
  XCCM, FB, SIO, ISO, AT, CV), kept as written: an exaggerated CC (XCCL) shows another part of the breast, so it is
  not silently turned into CC. `view_family(code)` gives the coarse family (XCCL -> CC) where a caller wants it.
- `side_and_view_in_text(text)`: side and view in a free-text description ("L CC", "RIGHT MLO", "rmlo").
- `is_left` / `is_right` / `is_cc` / `is_mlo`: predicates on any spelling (as NYU's `VIEWS.is_right`, ...).
- `MODALITIES`, `SINGLE_VIEW_POLICIES`, `CMMD_SUBTYPES`, `DUAL_VIEW_ORDER`, `COMMON_SIDE`.

Members print as their code (`str(Side.L) == "L"`), like `enum.StrEnum`; tables and files store the plain codes
(`Side.L.value`), which compare equal to the members.
"""

from __future__ import annotations

import math
import re
from enum import Enum

# Image modalities: "mammo" (mammograms) and "cxr" (chest X-rays, the intermediate transfer stage).
MODALITIES: tuple[str, ...] = ("mammo", "cxr")

# What a two-view task does with a breast imaged in one view only: keep it with that image in both view slots
# ("duplicate", the default) or leave it out ("drop").
SINGLE_VIEW_POLICIES: tuple[str, ...] = ("duplicate", "drop")

# The four molecular subtypes of CMMD, spelled as its clinical file spells them.
CMMD_SUBTYPES: tuple[str, ...] = ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")

# Every known mammographic view code -> its coarse family (exaggerated and rolled CC views are CC, LMO is MLO).
VIEW_FAMILIES: dict[str, str] = {
    "CC": "CC", "XCCL": "CC", "XCCM": "CC", "FB": "CC", "CV": "CC",
    "MLO": "MLO", "LMO": "MLO",
    "ML": "ML", "LM": "LM", "SIO": "SIO", "ISO": "ISO", "AT": "AT",
}
# Views that exist in mammography practice but that no task here uses: adapters keep them, tasks filter them.
OTHER_VIEWS: frozenset[str] = frozenset(VIEW_FAMILIES) - {"CC", "MLO"}

# Spellings of views besides their codes, compared upper case with everything but letters removed: the DICOM
# ViewCodeSequence code meanings (CID 4014), and LAT, which some vendors write for a true (medio-)lateral view.
_VIEW_SPELLINGS = {
    "CRANIOCAUDAL": "CC",
    "MEDIOLATERALOBLIQUE": "MLO",
    "MEDIOLATERAL": "ML",
    "LATEROMEDIAL": "LM",
    "LATEROMEDIALOBLIQUE": "LMO",
    "CRANIOCAUDALEXAGGERATEDLATERALLY": "XCCL",
    "CRANIOCAUDALEXAGGERATEDMEDIALLY": "XCCM",
    "CAUDOCRANIALFROMBELOW": "FB",
    "SUPEROLATERALTOINFEROMEDIALOBLIQUE": "SIO",
    "INFEROMEDIALTOSUPEROLATERALOBLIQUE": "ISO",
    "CLEAVAGE": "CV",
    "AXILLARYTAIL": "AT",
    "LAT": "ML",
}
# Side words; DICOM's B (both) and U (unpaired) are no side.
_SIDE_WORDS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
# Written for "no value" by spreadsheets and by str() of a missing value: a missing side, not a wrong one.
_MISSING_WORDS = frozenset({"", "NAN", "NONE"})


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _upper(value: object) -> str:
    """The text of a value (an enum member's value), stripped and upper case."""
    return str(getattr(value, "value", value)).strip().upper()


class Side(str, Enum):
    """Breast laterality."""

    L = "L"
    R = "R"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: object, strict: bool = False) -> Side | None:
        """'L', 'left', ' RIGHT ', a Side -> the Side; None, NaN, blanks, DICOM 'B' (both) / 'U' (unpaired) and any
        other text -> None. With `strict`, only a missing value (None, NaN, '', 'nan', 'none') gives None and
        anything else that is not a side raises ValueError (for a side a caller must have got right)."""
        if _is_missing(text):
            return None
        word = _upper(text)
        if word in _SIDE_WORDS:
            return cls(_SIDE_WORDS[word])
        if strict and word not in _MISSING_WORDS:
            raise ValueError(f"side must be L, R or missing, got {text!r}")
        return None


class View(str, Enum):
    """Mammographic view used by the tasks (the other views are codes, see `view_code`)."""

    CC = "CC"
    MLO = "MLO"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: object) -> View | None:
        """'CC', 'mlo', 'cranio-caudal', 'MEDIOLATERAL OBLIQUE', a View -> the View; other views (XCCL, ML, ...),
        None, NaN, blanks and junk -> None."""
        code = view_code(text)
        return cls(code) if code in (cls.CC.value, cls.MLO.value) else None


def side_code(text: object) -> str | None:
    """`Side.parse(text)` as the code tables store: 'L', 'R' or None."""
    side = Side.parse(text)
    return side.value if side is not None else None


def view_code(text: object) -> str | None:
    """Upper-case view code of any known mammographic view ('cc' -> 'CC', 'XCCL' stays 'XCCL', 'LAT' -> 'ML', DICOM
    code meanings such as 'medio-lateral oblique' -> 'MLO'); None, NaN, blanks and unknown text -> None."""
    if _is_missing(text):
        return None
    letters = re.sub(r"[^A-Z]", "", _upper(text))
    if letters in VIEW_FAMILIES:
        return letters
    return _VIEW_SPELLINGS.get(letters)


def view_family(view: object) -> str | None:
    """Coarse view family: XCCL/XCCM/FB/CV -> CC, LMO -> MLO, other codes unchanged (upper case); None stays None."""
    if _is_missing(view):
        return None
    code = _upper(view)
    return VIEW_FAMILIES.get(code, code)


def side_and_view_in_text(text: str | None) -> tuple[str | None, str | None]:
    """Side and view codes in a free-text description: "L CC", "RIGHT MLO", "R-MLO", "LCC", "rmlo" (the first of
    each wins; "AT" alone is taken for the English word, not the axillary tail)."""
    if not text:
        return None, None
    side = view = None
    for token in re.split(r"[^A-Z]+", str(text).upper()):
        if not token:
            continue
        if token in _SIDE_WORDS:
            side = side or _SIDE_WORDS[token]
        elif token in VIEW_FAMILIES and token != "AT":
            view = view or token
        elif token[0] in "LR" and token[1:] in VIEW_FAMILIES and token[1:] != "AT":
            side = side or token[0]
            view = view or token[1:]
    return side, view


def is_left(side: object) -> bool:
    """True for any spelling of the left side."""
    return Side.parse(side) is Side.L


def is_right(side: object) -> bool:
    """True for any spelling of the right side."""
    return Side.parse(side) is Side.R


def is_cc(view: object) -> bool:
    """True for a view of the CC family (CC, XCCL, XCCM, FB, CV) in any spelling."""
    return view_family(view_code(view)) == View.CC.value


def is_mlo(view: object) -> bool:
    """True for a view of the MLO family (MLO, LMO) in any spelling."""
    return view_family(view_code(view)) == View.MLO.value


# A dual-view tensor is (batch, 2, channels, height, width) with the views in this order.
DUAL_VIEW_ORDER: tuple[View, View] = (View.CC, View.MLO)

# Every breast is flipped to face this side before it reaches a model (see tlese.data.preprocess).
COMMON_SIDE: Side = Side.L
