"""The model spec: what a trained model is, recorded when a fold trains and carried forward unchanged.

A spec = registry name + `create_model` arguments + class names (in output order) + the preprocessing parameters the
model was trained with (as `tlese.data.preprocess.PreprocessParams.to_dict()` gives them, with their fingerprint and
the preprocessing code version). Training writes it into each fold's record and checkpoint; the bundle copies it;
predict, export, the web app and the DICOM node read it. Nothing downstream recomputes it from a YAML file.

It is plain data (JSON-safe); `build()` needs only the model registry, so this module imports no data code (the
preprocessing parameters are a dict here; `PreprocessParams.from_dict(spec.preprocess)` turns them back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPEC_VERSION = 1
CHECKPOINT_KEY = "tlese_model_spec"
"""Key of the spec inside a Lightning checkpoint dict (beside `state_dict`)."""


class ModelSpecError(ValueError):
    """A spec that is incomplete or contradicts itself (e.g. class names and the model's number of outputs)."""


@dataclass(frozen=True)
class ModelSpec:
    registry_name: str
    create_kwargs: dict[str, Any]
    class_names: list[str]
    preprocess: dict[str, Any] = field(default_factory=dict)
    preprocess_fingerprint: str = ""
    preprocess_version: int | None = None

    def __post_init__(self):
        if not self.registry_name:
            raise ModelSpecError("model spec: registry_name is empty")
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ModelSpecError(f"model spec: class_names must be unique and non-empty, got {self.class_names!r}")
        outputs = self.create_kwargs.get("num_classes")
        if outputs is not None and int(outputs) != len(self.class_names):
            raise ModelSpecError(f"model spec: {len(self.class_names)} class names {self.class_names} for a model "
                                 f"with num_classes={outputs}")

    # What a model consumes -----------------------------------------------------------------------------------
    @property
    def views(self) -> str:
        return str(self.create_kwargs.get("views", "single"))

    @property
    def in_chans(self) -> int:
        return int(self.create_kwargs.get("in_chans", 1))

    @property
    def image_size(self) -> int:
        return int(self.preprocess["size"])

    @property
    def fusion(self) -> str | None:
        return self.create_kwargs.get("fusion") if self.views == "dual" else None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One item's shape: (2, C, H, W) for dual-view models (CC, MLO), (C, H, W) otherwise."""
        item = (self.in_chans, self.image_size, self.image_size)
        return (2, *item) if self.views == "dual" else item

    # Building and serialising ---------------------------------------------------------------------------------
    def build(self, pretrained: bool = False):
        """The model, freshly created from the registry (random or ImageNet weights; load the trained ones)."""
        from tlese.models.registry import create_model

        return create_model(self.registry_name, pretrained=pretrained, **self.create_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"spec_version": SPEC_VERSION, "registry_name": self.registry_name,
                "create_kwargs": dict(self.create_kwargs), "class_names": list(self.class_names),
                "preprocess": dict(self.preprocess), "preprocess_fingerprint": self.preprocess_fingerprint,
                "preprocess_version": self.preprocess_version}

    @classmethod
    def from_dict(cls, value: dict[str, Any], where: str = "model spec") -> ModelSpec:
        if not isinstance(value, dict):
            raise ModelSpecError(f"{where}: not a mapping")
        version = value.get("spec_version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise ModelSpecError(f"{where}: spec version {version} is newer than this tlese reads ({SPEC_VERSION})")
        missing = [key for key in ("registry_name", "create_kwargs", "class_names") if key not in value]
        if missing:
            raise ModelSpecError(f"{where}: missing {missing}")
        try:
            return cls(registry_name=str(value["registry_name"]), create_kwargs=dict(value["create_kwargs"]),
                       class_names=[str(name) for name in value["class_names"]],
                       preprocess=dict(value.get("preprocess") or {}),
                       preprocess_fingerprint=str(value.get("preprocess_fingerprint") or ""),
                       preprocess_version=value.get("preprocess_version"))
        except ModelSpecError as error:
            raise ModelSpecError(f"{where}: {error}") from None
