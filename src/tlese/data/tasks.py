"""Tasks: which label column, which classes in which order, how raw labels group into classes, which views.

`task.encode(table)` turns an adapter table into a training table with an int `target` (index into
`task.classes`) and a `target_name`, and says in an `EncodeReport` what it dropped and why:

- rows whose view the task does not use;
- rows with an empty label (e.g. CMMD benign breasts have no subtype);
- rows whose label is neither a class nor in `grouping` ("error" policy: ValueError naming the label, the count
  and an example file; "skip": dropped and counted), or that `grouping` maps to None (excluded on purpose);
- for two-view tasks, breasts with only one of the views: "drop" removes them; "duplicate" keeps them, flagged
  in a boolean column `single_view`, and `tlese.data.loader.BreastDataset` shows the available image in both
  slots (no rows are copied, so per-image counts stay true).

A task is registered here by name, or defined where it is used: an experiment's `target.task` / `cxr.task` may be
a registered name or a mapping of `Task` fields, and `get_task` accepts either, so a new task needs no Python.
On the command line (`tlese folds --task`, `tlese evaluate --task`), `resolve_task` also takes a YAML file holding
that mapping, or the mapping itself inline: `--task '{name: her2, label_column: subtype, classes: [other, HER2]}'`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pandas as pd

from tlese.vocab import CMMD_SUBTYPES, MODALITIES, SINGLE_VIEW_POLICIES, View

ANY_VIEW = "any"
VIEWS = (*(view.value for view in View), ANY_VIEW)
UNKNOWN_LABEL_POLICIES = ("error", "skip")


@dataclass
class EncodeReport:
    """What `Task.encode` kept and dropped (counts of rows = images unless named breasts)."""

    task: str
    rows_in: int
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    unknown_labels: dict[str, int] = field(default_factory=dict)  # raw label -> rows (skip policy)
    single_view_breasts: int = 0
    single_view_policy: str = ""
    class_counts: dict[str, int] = field(default_factory=dict)  # class -> rows after encoding

    def summary(self) -> str:
        """One human-readable paragraph, for logs and the CLI."""
        parts = [f"task {self.task}: kept {self.rows_out} of {self.rows_in} images"]
        parts += [f"dropped {count} ({reason})" for reason, count in self.dropped.items() if count]
        if self.unknown_labels:
            skipped = ", ".join(f"{label!r} x{count}" for label, count in self.unknown_labels.items())
            parts.append(f"unknown labels skipped: {skipped}")
        if self.single_view_breasts:
            action = "dropped" if self.single_view_policy == "drop" else "kept (view duplicated at load time)"
            parts.append(f"{self.single_view_breasts} breast(s) with one view {action}")
        parts.append("classes: " + ", ".join(f"{name}={count}" for name, count in self.class_counts.items()))
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TaskFieldError(ValueError):
    """A bad value for one field of a `Task`; `key` names the field."""

    def __init__(self, task: Any, key: str, reason: str) -> None:
        super().__init__(f"task {task}: {key}: {reason}")
        self.key, self.reason = key, reason


TASK_REQUIRED_KEYS = ("name", "label_column", "classes")


@dataclass(frozen=True)
class Task:
    """A classification task over an adapter table.

    `grouping` maps raw label strings to class names (a value of None excludes that raw label on purpose);
    raw labels equal to a class name need no entry. `views` is ("CC", "MLO") for two-view breast tasks,
    a single view, or ("any",).
    """

    name: str
    label_column: str
    classes: tuple[str, ...]
    grouping: Mapping[str, str | None] | None = None
    modality: str = "mammo"
    views: tuple[str, ...] = ("CC", "MLO")
    single_view_policy: str = "duplicate"
    unknown_label_policy: str = "error"
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("name", "label_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise self._bad(key, f"expected a non-empty string, got {getattr(self, key)!r}")
        # Accept lists (from YAML) but store tuples, so a Task stays immutable.
        object.__setattr__(self, "classes", self._strings("classes", self.classes))
        object.__setattr__(self, "views", self._strings("views", self.views))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise self._bad("classes", f"must be at least two distinct names, got {list(self.classes)}")
        if self.grouping is not None:
            if not isinstance(self.grouping, Mapping):
                raise self._bad("grouping", f"expected a mapping raw label -> class (or null), got {self.grouping!r}")
            object.__setattr__(self, "grouping", dict(self.grouping))
            bad = [(raw, cls) for raw, cls in self.grouping.items()
                   if not isinstance(raw, str) or not (cls is None or isinstance(cls, str))]
            if bad:
                raise self._bad("grouping", "raw labels and classes must be strings (quote numbers in YAML), "
                                            f"got {bad[0][0]!r}: {bad[0][1]!r}")
            stray = set(self.grouping.values()) - {None} - set(self.classes)
            if stray:
                raise self._bad("grouping", f"maps to {sorted(stray)}, which are not in classes {list(self.classes)}")
        for key, choices in (("modality", MODALITIES), ("single_view_policy", SINGLE_VIEW_POLICIES),
                             ("unknown_label_policy", UNKNOWN_LABEL_POLICIES)):
            if getattr(self, key) not in choices:
                raise self._bad(key, f"{getattr(self, key)!r} is not one of {list(choices)}")
        if not self.views or any(v not in VIEWS for v in self.views) or len(set(self.views)) != len(self.views):
            raise self._bad("views", f"expected distinct views from {list(VIEWS)}, got {list(self.views)}")
        if ANY_VIEW in self.views and len(self.views) > 1:
            raise self._bad("views", f"{ANY_VIEW!r} cannot be combined with named views, got {list(self.views)}")
        if not isinstance(self.description, str):
            raise self._bad("description", f"expected a string, got {self.description!r}")

    def _bad(self, key: str, reason: str) -> TaskFieldError:
        return TaskFieldError(self.name, key, reason)

    def _strings(self, key: str, values: Any) -> tuple[str, ...]:
        """A list/tuple of non-empty strings as a tuple; a bare string (a common YAML slip) is an error."""
        if not isinstance(values, (list, tuple)):
            raise self._bad(key, f"expected a list of strings, got {values!r}")
        if not all(isinstance(value, str) and value for value in values):
            raise self._bad(key, f"expected non-empty strings (quote numbers in YAML), got {list(values)}")
        return tuple(values)

    def __hash__(self) -> int:
        # `grouping` is a dict (unhashable); name, column and classes identify a task well enough for hashing.
        return hash((self.name, self.label_column, self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dual_view(self) -> bool:
        """True when each item is a breast seen in two views (CC + MLO)."""
        return len(self.views) == 2

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "task") -> Task:
        """Build from a mapping of `Task` fields (e.g. an inline `target.task` in an experiment YAML).

        Unknown and missing keys raise ValueError listing the valid ones; a bad value raises ValueError naming
        `<where>.<key>` (e.g. `target.task.views: ...`).
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: expected a task name or a mapping of task fields, got {config!r}")
        valid = [f.name for f in fields(cls)]
        unknown = set(config) - set(valid)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown, key=str)}; valid: {valid}")
        missing = [key for key in TASK_REQUIRED_KEYS if key not in config]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (required: {list(TASK_REQUIRED_KEYS)})")
        try:
            return cls(**dict(config))
        except TaskFieldError as error:
            raise ValueError(f"{where}.{error.key}: {error.reason}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"], data["views"] = list(self.classes), list(self.views)
        return data

    def class_of(self, raw: str) -> str | None:
        """Class name for a raw label, None when `grouping` excludes it; KeyError when unknown."""
        if self.grouping is not None and raw in self.grouping:
            return self.grouping[raw]
        if raw in self.classes:
            return raw
        raise KeyError(raw)

    def encode(self, table: pd.DataFrame) -> tuple[pd.DataFrame, EncodeReport]:
        """Filter views, map labels to classes, apply the single-view policy; add `target` and `target_name`."""
        if self.label_column not in table.columns:
            raise ValueError(f"task {self.name}: the table has no column {self.label_column!r} "
                             f"(columns: {list(table.columns)})")
        modalities = set(table["modality"]) if "modality" in table.columns else set()
        if modalities - {self.modality}:
            raise ValueError(f"task {self.name} is for {self.modality} images, the table holds {sorted(modalities)}")
        report = EncodeReport(task=self.name, rows_in=len(table), single_view_policy=self.single_view_policy)
        work = table.copy()
        if ANY_VIEW not in self.views:
            keep = work["view"].isin(self.views)
            report.dropped[f"view not in {'/'.join(self.views)}"] = int((~keep).sum())
            work = work[keep]

        raw = work[self.label_column].fillna("").astype(str).str.strip()
        empty = raw == ""
        report.dropped["empty label"] = int(empty.sum())
        work, raw = work[~empty], raw[~empty]

        names, unknown, excluded = [], Counter(), 0
        for value in raw:
            try:
                name = self.class_of(value)
            except KeyError:
                unknown[value] += 1
                name = None
            else:
                excluded += name is None
            names.append(name)
        if unknown and self.unknown_label_policy == "error":
            label, count = unknown.most_common(1)[0]
            example = work["path"].iloc[list(raw).index(label)] if "path" in work.columns else "?"
            raise ValueError(
                f"task {self.name}: label {label!r} in column {self.label_column!r} ({count} row(s), e.g. {example}) "
                f"is not one of {list(self.classes)} nor in the task's grouping"
                + (f"; {len(unknown) - 1} other unknown label(s)" if len(unknown) > 1 else "")
                + "; set unknown_label_policy='skip' to drop such rows"
            )
        report.unknown_labels = dict(unknown)
        report.dropped["unknown label"] = sum(unknown.values())
        report.dropped["label excluded by grouping"] = excluded
        work = work.assign(target_name=names)
        work = work[work["target_name"].notna()]
        index_of = {name: index for index, name in enumerate(self.classes)}
        work = work.assign(target=work["target_name"].map(index_of).astype(int))

        if self.dual_view:
            work = self._complete_views(work, report)
        report.rows_out = len(work)
        counts = work["target_name"].value_counts()
        report.class_counts = {name: int(counts.get(name, 0)) for name in self.classes}
        report.dropped = {reason: count for reason, count in report.dropped.items() if count}
        return work.reset_index(drop=True), report

    def _complete_views(self, work: pd.DataFrame, report: EncodeReport) -> pd.DataFrame:
        """Apply the single-view policy to breasts lacking one of the two views; check breast labels agree."""
        conflicts = work.groupby(["patient_id", "side"])["target"].nunique()
        conflicts = conflicts[conflicts > 1]
        if len(conflicts):
            patient, side = conflicts.index[0]
            raise ValueError(f"task {self.name}: {len(conflicts)} breast(s) have images with different labels, "
                             f"e.g. patient {patient} side {side}; a two-view task needs one label per breast")
        views_per_breast = work.groupby(["patient_id", "side"])["view"].agg(lambda views: frozenset(views))
        incomplete = views_per_breast[views_per_breast.map(lambda views: not set(self.views) <= views)]
        report.single_view_breasts = len(incomplete)
        if not len(incomplete):
            return work.assign(single_view=False)
        keys = pd.MultiIndex.from_frame(work[["patient_id", "side"]])
        in_incomplete = keys.isin(incomplete.index)
        if self.single_view_policy == "drop":
            report.dropped["breast lacks a view (policy drop)"] = int(in_incomplete.sum())
            return work[~in_incomplete].assign(single_view=False)
        # "duplicate": keep the breast; BreastDataset fills the missing view with the present image at load time.
        # Rows are flagged rather than copied, so per-image counts and metrics do not count an image twice.
        return work.assign(single_view=in_incomplete)


# ---------------------------------------------------------------------------------------------------------------
# Registry

_TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Add a task to the registry (ValueError when the name is taken, unless `replace`)."""
    if task.name in _TASKS and not replace and _TASKS[task.name] != task:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get_task(task: str | Mapping[str, Any] | Task) -> Task:
    """A task from its registered name or from a mapping of its fields (`Task.from_dict`); a `Task` is returned
    as is. An unknown name raises ValueError listing the registered ones."""
    if isinstance(task, Task):
        return task
    if isinstance(task, Mapping):
        return Task.from_dict(task)
    if not isinstance(task, str):
        raise ValueError(f"a task is a registered name or a mapping of task fields, got {task!r}")
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(list_tasks())}") from None


def resolve_task(value: str | Mapping[str, Any] | Task) -> Task:
    """A task from a registered name, a path to a YAML (or JSON) file holding a mapping of task fields, or such a
    mapping written inline (YAML flow style or JSON). Mappings and `Task`s are accepted as `get_task` accepts them.

    Every failure is a ValueError (FileNotFoundError for a missing file) naming the name, file or text and the
    problem, YAML syntax errors with their line and column.
    """
    if not isinstance(value, str):
        return get_task(value)
    text = value.strip()
    if text in _TASKS:
        return _TASKS[text]
    looks_inline = text.startswith("{") or "\n" in text or (":" in text and not _looks_like_path(text))
    if looks_inline:
        return Task.from_dict(parse_yaml(text, "inline task"), where="inline task")
    if _looks_like_path(text):
        from pathlib import Path

        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: task file not found (a task is a registered name, a YAML file or an "
                                    f"inline mapping; registered: {', '.join(list_tasks())})")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read the task file ({error})") from None
        return Task.from_dict(parse_yaml(content, str(path)), where=str(path))
    raise ValueError(f"unknown task {text!r}; valid: {', '.join(list_tasks())} (or a YAML file path, or an inline "
                     "mapping such as '{name: t, label_column: subtype, classes: [a, b]}')")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith((".yaml", ".yml", ".json"))


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML (JSON included); a syntax error becomes ValueError with `where`, line and column (the one place that
    words YAML syntax errors: tasks and experiment configs)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error{place}: {problem}") from None


def list_tasks() -> list[str]:
    return sorted(_TASKS)


_COVID3 = ("covid", "no_findings", "pneumonia")
# Spellings of the same three classes in DarkCovidNet, COVIDx (V5-V7A) and the COVID-19 Radiography Database.
_COVID3_GROUPING = {
    "COVID": "covid", "COVID-19": "covid", "Covid-19": "covid",
    "Normal": "no_findings", "normal": "no_findings", "No_findings": "no_findings",
    "Viral Pneumonia": "pneumonia", "Pneumonia": "pneumonia",
}
_COVID2_GROUPING = {
    **{raw: ("covid" if cls == "covid" else "other") for raw, cls in _COVID3_GROUPING.items()},
    "no_findings": "other", "pneumonia": "other", "Lung_Opacity": "other",
    "positive": "covid", "negative": "other",  # COVIDx V8+
}

for _task in (
    Task("cmmd_subtype4", "subtype", CMMD_SUBTYPES,
         description="CMMD molecular subtype (4 classes), CC+MLO per breast"),
    Task("cmmd_luminal", "subtype", ("luminal", "non_luminal"),
         grouping={"Luminal A": "luminal", "Luminal B": "luminal", "HER2-enriched": "non_luminal",
                   "triple negative": "non_luminal"},
         description="CMMD Luminal (A+B) vs non-Luminal (HER2-enriched + triple negative)"),
    Task("cmmd_malignancy", "classification", ("Benign", "Malignant"), description="CMMD benign vs malignant breast"),
    Task("cbis_malignancy", "pathology", ("benign", "malignant"),
         grouping={"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign", "MALIGNANT": "malignant"},
         description="CBIS-DDSM breast pathology (worst finding), benign vs malignant"),
    Task("vindr_density", "breast_density", ("A", "B", "C", "D"),
         grouping={f"DENSITY {letter}": letter for letter in "ABCD"}, description="VinDr-Mammo breast density A-D"),
    Task("mias_density", "tissue", ("F", "G", "D"), views=("MLO",),
         description="mini-MIAS background tissue: fatty, fatty-glandular, dense-glandular"),
    Task("mias_abnormal", "abnormal", ("normal", "abnormal"), views=("MLO",),
         description="mini-MIAS normal vs any abnormality"),
    Task("mias_severity", "severity", ("benign", "malignant"), grouping={"B": "benign", "M": "malignant"},
         views=("MLO",), description="mini-MIAS benign vs malignant abnormal images (normals have no severity)"),
    Task("cxr_covid3", "label", _COVID3, grouping=_COVID3_GROUPING, modality="cxr", views=(ANY_VIEW,),
         description="chest X-ray COVID-19 / no findings / pneumonia (DarkCovidNet classes)"),
    Task("cxr_covid2", "label", ("covid", "other"), grouping=_COVID2_GROUPING, modality="cxr", views=(ANY_VIEW,),
         description="chest X-ray COVID-19 vs other"),
    Task("synth_subtype4", "subtype", CMMD_SUBTYPES, description="synthetic CMMD-layout subtypes (tlese synth)"),
    Task("synth_cxr3", "label", _COVID3, modality="cxr", views=(ANY_VIEW,),
         description="synthetic chest X-rays (tlese synth)"),
):
    register_task(_task)
