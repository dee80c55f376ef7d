"""Experiment configuration: YAML files validated into dataclasses, with `key.path=value` overrides from the CLI.

Unknown keys, wrong types and bad choices fail with the file and the key named, before any training starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlese.data.preprocess import DEFAULT_IMAGE_SIZE
from tlese.files import write_text_atomic


@dataclass(frozen=True)
class Transfer:
    """Which stages a transfer mode runs before the target task."""

    imagenet: bool
    cxr: bool


TRANSFER = {
    "scratch": Transfer(imagenet=False, cxr=False),  # random init -> target
    "imagenet": Transfer(imagenet=True, cxr=False),  # ImageNet -> target
    "cxr": Transfer(imagenet=False, cxr=True),  # random -> chest X-ray -> target
    "double": Transfer(imagenet=True, cxr=True),  # ImageNet -> chest X-ray -> target (the method)
}
"""The target task is mammography in the method; any task works (a CXR-only cross-validation puts the CXR data in
`target`)."""
TRANSFER_MODES = tuple(TRANSFER)


class ConfigError(ValueError):
    """A configuration problem, naming the source and the key."""


@dataclass
class DataSource:
    """One dataset: an adapter name from `tlese.data.datasets`, its root folder and the task to learn on it.

    `task` is a registered task name (`tlese.data.tasks.list_tasks()`) or an inline mapping of `Task` fields
    (name, label_column, classes, grouping, views, modality, single_view_policy, ...); either goes to
    `tlese.data.tasks.get_task`.
    """

    adapter: str = ""
    root: str = ""
    task: str | dict[str, Any] = ""  # a registered task name, or the task itself (see tlese.data.tasks.Task)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        """Build the task now, so an unknown name or a bad inline task fails (naming `<where>.task[.<key>]`)
        before any data is read. An empty task is left to the caller's required-keys check."""
        if not self.task:
            return
        from tlese.data.tasks import Task, get_task

        try:
            if isinstance(self.task, dict):
                Task.from_dict(self.task, where=f"{where}.task")
            else:
                get_task(self.task)
        except ValueError as error:
            message = str(error) if isinstance(self.task, dict) else f"{where}.task: {error}"
            raise ConfigError(message) from None


@dataclass
class Recipe:
    """How one stage is trained (the same engine serves every stage)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    warmup_epochs: float = 1.0
    scheduler: str = "cosine"  # cosine | constant
    class_balance: str = "loss_weights"  # loss_weights | sampler | none
    label_smoothing: float = 0.0
    early_stopping_patience: int = 5
    monitor: str = "val_loss"  # val_loss | val_auc
    limit_train_batches: float | int = 1.0
    precision: str = "auto"  # auto: bf16/16-mixed on GPU, 32 on CPU
    channels_last: str = "auto"  # auto: on GPU only
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"  # e.g. ddp
    num_workers: int = 0
    val_fraction: float = 0.15
    augment: dict[str, Any] = field(default_factory=dict)
    progress_bar: bool = True

    def validate(self, where: str) -> None:
        _choice(self.optimizer, ("adamw", "sgd"), f"{where}.optimizer")
        _choice(self.scheduler, ("cosine", "constant"), f"{where}.scheduler")
        _choice(self.class_balance, ("loss_weights", "sampler", "none"), f"{where}.class_balance")
        _choice(self.monitor, ("val_loss", "val_auc"), f"{where}.monitor")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}: epochs and batch_size must be >= 1")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"{where}.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class Arm:
    """One model trained one way: the unit that `tlese compare` puts side by side."""

    name: str = ""
    model: str = "tlese_lite0"
    transfer: str = "double"
    model_options: dict[str, Any] = field(default_factory=dict)
    # What to do when ImageNet weights are not on this machine: "error" (default) or "scratch" (loudly recorded).
    missing_weights: str = "error"

    def validate(self, where: str) -> None:
        if not self.name:
            raise ConfigError(f"{where}.name is required")
        _choice(self.transfer, TRANSFER_MODES, f"{where}.transfer")
        _choice(self.missing_weights, ("error", "scratch"), f"{where}.missing_weights")


@dataclass
class Experiment:
    """A whole experiment: data, preprocessing, stage recipes, arms and cross-validation."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    cache_dir: str = ".cache/tlese"
    image_size: int = DEFAULT_IMAGE_SIZE  # model input side in pixels
    # Preprocessing parameters beyond size and modality (tlese.data.preprocess.PreprocessParams.build's keys); the
    # same section and rule serve `tlese prepare --param KEY=VALUE` and, through the bundle, prediction.
    preprocess: dict[str, Any] = field(default_factory=dict)
    in_chans: int = 1
    views: str = "dual"  # dual: one prediction per breast from CC+MLO; single: per image, fused per breast by mean
    fusion: str = "mean_logits"
    folds: int = 5
    folds_file: str = ""  # reuse saved folds (CSV) instead of making new ones
    # Repeated k-fold CV: repeat i draws its own patient-level folds and trains with its own seed
    # (tlese.train.rundir.repeat_seed); repeat 0 is the single CV.
    repeats: int = 1
    prepare_workers: int = 2
    target: DataSource = field(default_factory=DataSource)
    cxr: DataSource = field(default_factory=DataSource)
    cxr_recipe: Recipe = field(default_factory=Recipe)
    target_recipe: Recipe = field(default_factory=Recipe)
    arms: list[Arm] = field(default_factory=list)
    bootstrap: int = 1000

    def validate(self) -> None:
        _choice(self.views, ("single", "dual"), "views")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.repeats > 1 and self.folds_file:
            raise ConfigError("folds_file fixes one partition of the patients; repeats > 1 draws a new one per repeat "
                              "(drop folds_file, or set repeats: 1)")
        if not self.arms:
            raise ConfigError("arms: at least one arm (model + transfer mode) is required")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arms: names must be unique, got {names}")
        from tlese.train.rundir import RESERVED_ARM_NAMES

        reserved = sorted(set(names) & RESERVED_ARM_NAMES)
        if reserved:
            raise ConfigError(f"arms: {reserved} is a folder of the run, not an arm name; rename the arm")
        for index, arm in enumerate(self.arms):
            arm.validate(f"arms[{index}]")
        self.cxr_recipe.validate("cxr_recipe")
        self.target_recipe.validate("target_recipe")
        if not (self.target.adapter and self.target.root and self.target.task):
            raise ConfigError("target: adapter, root and task are required")
        if any(TRANSFER[arm.transfer].cxr for arm in self.arms) and not (
            self.cxr.adapter and self.cxr.root and self.cxr.task
        ):
            raise ConfigError("cxr: adapter, root and task are required by arms with transfer 'cxr' or 'double'")
        self.target.validate("target")
        self.cxr.validate("cxr")

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"no arm named {name!r}; arms: {[arm.name for arm in self.arms]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_repeat(self, repeat: int) -> Experiment:
        """The experiment as repeat `repeat` runs it: the same settings with that repeat's folds and training seed."""
        from tlese.train.rundir import repeat_seed

        if not 0 <= repeat < self.repeats:
            raise ConfigError(f"repeat {repeat} does not exist; repeats: 0..{self.repeats - 1}")
        return dataclasses.replace(self, seed=repeat_seed(self.seed, repeat))


def _choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")


def _build(cls: type, data: Any, where: str) -> Any:
    """Turn nested dicts into the dataclass `cls`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    allowed = typing.get_args(hint) if origin in (typing.Union, __import__("types").UnionType) else (hint,)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where}: expected {hint}, got a boolean")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)):
            return float(value) if not (int in allowed and isinstance(value, int)) else value
        base = typing.get_origin(kind) or kind  # dict[str, Any] -> dict
        if isinstance(value, base):
            return dict(value) if base is dict else value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["target_recipe.epochs=3", "arms=[...]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        cursor = nested
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = _yaml(raw, f"--set {item}")
    return nested


def _yaml(text: str, where: str) -> Any:
    """YAML text parsed, a syntax error raised as a ConfigError naming `where` and the line and column."""
    from tlese.data.tasks import parse_yaml

    try:
        return parse_yaml(text, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> Experiment:
    """Read a YAML experiment (or start from `base`), apply overrides, validate.

    Relative `root`, `output_dir`, `cache_dir` and `folds_file` in a file are resolved against the file's folder,
    so configs carry no absolute paths and work from any working directory.
    """
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: experiment file not found")
        loaded = _yaml(path.read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = _merge(data, _resolve_paths(loaded, path.parent))
        source = str(path)
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    try:
        experiment = _build(Experiment, data, "")
        experiment.validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return experiment


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    resolved = dict(data)
    for key in ("output_dir", "cache_dir", "folds_file"):
        if resolved.get(key):
            resolved[key] = str((folder / resolved[key]).resolve())
    for key in ("target", "cxr"):
        source = resolved.get(key)
        if isinstance(source, dict) and source.get("root"):
            resolved[key] = {**source, "root": str((folder / source["root"]).resolve())}
    return resolved


def dump_experiment(experiment: Experiment, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a full disk leaves the old file or none, never half)."""
    write_text_atomic(path, yaml.safe_dump(experiment.to_dict(), sort_keys=False))
