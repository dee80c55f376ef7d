"""The model table and `@register_model`, kept apart from `registry` so that the model modules can register into it
while `registry` imports them (no import circle), and so that this table costs no torch import."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tlese.models.weights import WeightSource


@dataclass(frozen=True)
class ModelEntry:
    name: str
    # (in_chans, **kw) -> backbone with num_features, gradcam_layer, first_conv
    build_backbone: Callable[..., Any]
    source: WeightSource  # ImageNet weights for pretrained=True; also fixes the input normalisation
    description: str


REGISTRY: dict[str, ModelEntry] = {}


def register_model(source: WeightSource, description: str = "") -> Callable:
    """Register a backbone builder under its function name."""

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        if build.__name__ in REGISTRY:
            raise ValueError(f"model {build.__name__!r} is registered twice")
        doc = description or (build.__doc__ or "").strip().splitlines()[0]
        REGISTRY[build.__name__] = ModelEntry(build.__name__, build, source, doc)
        return build

    return decorator
