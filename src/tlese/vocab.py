"""Shared vocabulary: views, sides and the fixed order of views in a dual-view tensor."""

from __future__ import annotations

from enum import Enum


class View(str, Enum):
    """Mammographic view."""

    CC = "CC"
    MLO = "MLO"


class Side(str, Enum):
    """Breast laterality."""

    L = "L"
    R = "R"


# A dual-view tensor is (batch, 2, channels, height, width) with the views in this order.
DUAL_VIEW_ORDER: tuple[View, View] = (View.CC, View.MLO)

# Every breast is flipped to face this side before it reaches a model (see tlese.data.preprocess).
COMMON_SIDE: Side = Side.L
