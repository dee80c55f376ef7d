"""The run report: Markdown and self-contained HTML (plots embedded as base64 PNG) written into a run directory.

Plots use `matplotlib.figure.Figure` directly (no pyplot global state, no display needed). HTML is written with the
standard library only (html.escape + f-strings); tables come from `DataFrame.to_html`, which needs no jinja2.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from tlese.evaluate.metrics import classification_metrics, predictions_to_arrays
from tlese.evaluate.tables import fold_warnings
from tlese.provenance import environment_info  # noqa: F401  (re-exported: reports record it)

PLOTS_DIR = "plots"
_LOSS_COLUMNS = ("train_loss", "val_loss")
_NON_METRIC_COLUMNS = ("epoch", "stage", "fold", "step", "lr", "time", "seconds")


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_roc_curves(y_true, probs, class_names: Sequence[str], path, title: str = "ROC curves") -> Path:
    """One-vs-rest ROC curve per class and their macro average (TPR interpolated on a common FPR grid).

    For two classes only the curve of the positive class (``class_names[1]``) is drawn. Classes absent from
    ``y_true`` (or the only class present) are listed in the legend as "not defined".
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=float)
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    grid = np.linspace(0, 1, 201)
    interpolated = []
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for k in classes:
        is_positive = y_true == k
        name = class_names[k]
        if is_positive.all() or not is_positive.any():
            axes.plot([], [], " ", label=f"{name}: not defined (one class)")
            continue
        fpr, tpr, _ = roc_curve(is_positive, probs[:, k])
        auc = float(area_under_curve(fpr, tpr))
        axes.plot(fpr, tpr, linewidth=1.3, label=f"{name} (AUC {auc:.3f})")
        interpolated.append(np.interp(grid, fpr, tpr))
    if len(interpolated) > 1:
        mean_tpr = np.mean(interpolated, axis=0)
        mean_tpr[0] = 0.0
        axes.plot(grid, mean_tpr, color="black", linewidth=2.2, linestyle="--",
                  label=f"macro average (AUC {area_under_curve(grid, mean_tpr):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title=title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_confusion_matrix(cm, class_names: Sequence[str], path, normalise: bool = True,
                          title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows = true class); ``normalise`` colours by row fraction and prints counts and %."""
    cm = np.asarray(cm, dtype=float)
    row_totals = cm.sum(axis=1, keepdims=True)
    fractions = np.divide(cm, row_totals, out=np.zeros_like(cm), where=row_totals > 0)
    shown = fractions if normalise else cm
    size = 1.2 + 1.1 * len(class_names)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else max(cm.max(), 1))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            text = f"{int(cm[i, j])}\n{100 * fractions[i, j]:.0f}%" if normalise else f"{int(cm[i, j])}"
            colour = "white" if shown[i, j] > 0.6 * (1 if normalise else cm.max()) else "black"
            axes.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=30, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted", ylabel="true", title=title + (" (row-normalised)" if normalise else ""))
    return _save(figure, path)


def plot_calibration(y_true, probs, class_names: Sequence[str], path, bins: int = 10,
                     title: str = "Calibration (reliability diagram)") -> Path:
    """Top-label reliability diagram: predictions binned by confidence (max probability) into `bins` equal-width
    bins; per bin the accuracy against the mean confidence (marker area ~ count), the diagonal, and below it the
    number of predictions per bin. The legend gives the top-label ECE (`tlese.bundle.calibration` binning)."""
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probs must be (N, {len(class_names)}), got shape {probs.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y_true).astype(float) if len(probs) else np.zeros(0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    centres, accuracy, mean_conf, counts = [], [], [], np.zeros(bins, dtype=int)
    ece = 0.0
    for index in range(bins):
        members = which == index
        counts[index] = int(members.sum())
        if members.any():
            centres.append(index)
            accuracy.append(float(correct[members].mean()))
            mean_conf.append(float(confidence[members].mean()))
            ece += members.mean() * abs(accuracy[-1] - mean_conf[-1])
    figure = Figure(figsize=(5.5, 6.2), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="perfect calibration")
    if centres:
        sizes = 20 + 180 * counts[centres] / max(counts.max(), 1)
        top.plot(mean_conf, accuracy, color="C0", linewidth=1.2)
        top.scatter(mean_conf, accuracy, s=sizes, color="C0", zorder=3,
                    label=f"top label (ECE {ece:.3f}, n={len(probs)}, {bins} bins)")
    else:
        top.plot([], [], " ", label="no predictions")
    top.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="accuracy of the top label", title=title)
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], counts, width=1.0 / bins, align="edge", color="C0", alpha=0.5, edgecolor="white")
    bottom.set(xlabel="confidence (max probability)", ylabel="predictions")
    return _save(figure, path)


def _fold_label(fold) -> str:
    # A fold column holding NaN for an un-folded stage is float: show 0.0 as 0.
    return str(int(fold)) if isinstance(fold, float | np.floating) and float(fold).is_integer() else str(fold)


def plot_learning_curves(history: pd.DataFrame, path, title: str = "Learning curves") -> Path:
    """Loss (train solid, validation dashed) and each other metric column against epoch.

    ``history`` has ``epoch``, optionally ``stage`` (one row of panels per stage) and ``fold`` (one line per fold),
    ``train_loss``/``val_loss`` and any number of metric columns (e.g. ``val_auc``).
    """
    if "epoch" not in history.columns:
        raise ValueError(f"history needs an 'epoch' column; it has {list(history.columns)}")
    loss_columns = [column for column in _LOSS_COLUMNS if column in history.columns]
    metric_columns = [column for column in history.columns
                      if column not in (*_NON_METRIC_COLUMNS, *_LOSS_COLUMNS)
                      and pd.api.types.is_numeric_dtype(history[column])]
    panels = (["loss"] if loss_columns else []) + metric_columns
    if not panels:
        raise ValueError("history has no loss or metric columns to plot")
    stages = list(pd.unique(history["stage"].dropna())) if "stage" in history.columns else []
    stages = stages or [None]
    figure = Figure(figsize=(4.2 * len(panels), 3.2 * len(stages)), layout="constrained")
    axes_grid = np.atleast_2d(figure.subplots(len(stages), len(panels), squeeze=False))
    colours = [f"C{i}" for i in range(10)]
    for row, stage in enumerate(stages):
        stage_rows = history if stage is None else history[history["stage"] == stage]
        # A stage trained once (e.g. the CXR stage, not cross-validated) has no fold (NaN or ""): one line then.
        folds = list(pd.unique(stage_rows["fold"].dropna())) if "fold" in stage_rows.columns else []
        folds = [fold for fold in folds if str(fold).strip() != ""] or [None]
        for column_index, panel in enumerate(panels):
            axes = axes_grid[row, column_index]
            for fold_index, fold in enumerate(folds):
                rows = stage_rows if fold is None else stage_rows[stage_rows["fold"] == fold]
                rows = rows.sort_values("epoch")
                colour = colours[fold_index % len(colours)]
                label_prefix = "" if fold is None else f"fold {_fold_label(fold)} "
                for column in (loss_columns if panel == "loss" else [panel]):
                    style = "--" if column.startswith("val") and panel == "loss" else "-"
                    axes.plot(rows["epoch"], rows[column], style, color=colour, linewidth=1.2,
                              label=f"{label_prefix}{column}")
            axes.set(xlabel="epoch", ylabel=panel, title=panel if stage is None else f"{stage}: {panel}")
            axes.grid(alpha=0.3)
            if column_index == 0:
                axes.legend(fontsize=7)
    figure.suptitle(title)
    return _save(figure, path)


def plot_repeats(per_repeat: pd.DataFrame, metric: str, path, title: str | None = None,
                 label_repeats: bool | None = None) -> Path:
    """One metric of a repeated k-fold CV: per arm (x axis) a strip of points, one per repeat, and beside it the mean
    (wide marker) with whiskers for ± sd over the repeats.

    ``per_repeat`` has ``arm, repeat`` and the ``metric`` column (e.g. the pooled out-of-fold metric of each repeat);
    arms may have different numbers of repeats, and one repeat gives a mean without whiskers. With a ``complete``
    column, incomplete repeats (folds missing) are drawn hollow and left out of the mean ± sd unless the arm has no
    complete one. Points are jittered deterministically by their rank within the arm. ``label_repeats`` writes each
    point's repeat number beside it (default: when no arm has more than 10 repeats).
    """
    missing = [column for column in ("arm", "repeat", metric) if column not in per_repeat.columns]
    if missing:
        raise ValueError(f"per_repeat lacks the columns {missing}; it has {list(per_repeat.columns)}")
    arms = list(pd.unique(per_repeat["arm"]))
    if not arms:
        raise ValueError("per_repeat has no rows to plot")
    counts = per_repeat.groupby("arm", sort=False).size()
    if label_repeats is None:
        label_repeats = int(counts.max()) <= 10
    figure = Figure(figsize=(max(4.0, 1.5 + 1.4 * len(arms)), 4.2), layout="constrained")
    axes = figure.subplots()
    incomplete_drawn = False
    for position, arm in enumerate(arms):
        rows = per_repeat[per_repeat["arm"] == arm].sort_values("repeat")
        values = rows[metric].to_numpy(dtype=float)
        complete = rows["complete"].to_numpy(dtype=bool) if "complete" in rows.columns else np.ones(len(rows), bool)
        defined = np.isfinite(values)
        # Spread the strip over [-0.2, 0.1] of the arm's slot, left of the mean marker at +0.25.
        jitter = np.linspace(-0.2, 0.1, len(rows)) if len(rows) > 1 else np.array([-0.05])
        x = position + jitter
        colour = f"C{position % 10}"
        axes.scatter(x[defined & complete], values[defined & complete], s=28, color=colour, zorder=3)
        if (defined & ~complete).any():
            incomplete_drawn = True
            axes.scatter(x[defined & ~complete], values[defined & ~complete], s=28, facecolors="none",
                         edgecolors=colour, zorder=3)
        if label_repeats:
            for x_point, value, repeat in zip(x[defined], values[defined], rows["repeat"].to_numpy()[defined]):
                axes.annotate(_fold_label(repeat), (x_point, value), xytext=(3, 2), textcoords="offset points",
                              fontsize=7, color="dimgrey")
        used = values[defined & complete] if (defined & complete).any() else values[defined]
        if used.size:
            sd = float(np.std(used, ddof=1)) if used.size > 1 else None
            axes.errorbar(position + 0.25, float(used.mean()), yerr=sd, fmt="_", markersize=16, markeredgewidth=2,
                          capsize=4, color="black", zorder=4)
        else:
            axes.annotate("not defined", (position, 0.5), xycoords=("data", "axes fraction"), ha="center",
                          fontsize=8, color="dimgrey")
    axes.set_xticks(range(len(arms)), [f"{arm}\n({counts[arm]} repeat{'s' if counts[arm] != 1 else ''})"
                                       for arm in arms], fontsize=8)
    axes.set_xlim(-0.6, len(arms) - 0.4)
    axes.set(ylabel=metric, title=title or f"{metric} per repeat")
    axes.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="none", color="grey", label="one repeat"),
               Line2D([], [], marker="_", markersize=12, markeredgewidth=2, linestyle="none", color="black",
                      label="mean ± sd over repeats")]
    if incomplete_drawn:
        handles.append(Line2D([], [], marker="o", linestyle="none", markerfacecolor="none", color="grey",
                              label="incomplete repeat (not in mean ± sd)"))
    axes.legend(handles=handles, fontsize=7, loc="best")
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------------------------
# Report


def _format_cell(value) -> str:
    if isinstance(value, float | np.floating):
        return "NaN" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no `tabulate` dependency); floats with 4 significant digits."""
    header = [str(column) for column in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=False):
        cells = [_format_cell(value).replace("|", "\\|").replace("\n", " ") for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(index=False, border=0, classes="table", na_rep="NaN", float_format=lambda v: f"{v:.4g}")


# What an empty cell of these columns means, in words (a CSV read back turns their "" into NaN).
EMPTY_CELL_WORDS = {"missing_classes": "none"}


def _displayed(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it: text columns without NaN (an empty text cell is empty, or the word of
    `EMPTY_CELL_WORDS`); numbers as they are (an undefined metric stays NaN)."""
    shown = table.copy()
    for column in shown.columns:
        if column in EMPTY_CELL_WORDS or shown[column].dtype == object:
            text = shown[column].astype(object).where(shown[column].notna(), "")
            word = EMPTY_CELL_WORDS.get(str(column))
            shown[column] = text.map(lambda value, word=word: word if word and value == "" else value)
    return shown


def _plain(value):
    """Config values as YAML-safe builtins (paths, numpy scalars, tuples, dataclass-like objects -> str/list)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _key_value_table(mapping: dict) -> pd.DataFrame:
    return pd.DataFrame({"key": list(mapping), "value": [str(value) for value in mapping.values()]})


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1, h2, p, ul, pre { max-width: 1100px; }
table.table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; max-width: 100%; }
table.table th, table.table td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right;
  overflow-wrap: anywhere; }
table.table th { background: #f2f2f2; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
.warning { color: #8a4b00; }
"""


def write_report(
    run_dir,
    *,
    title: str,
    summary_table: pd.DataFrame,
    per_fold_table: pd.DataFrame | None,
    predictions: pd.DataFrame,
    class_names: Sequence[str],
    history: pd.DataFrame | None = None,
    config: dict | None = None,
    environment: dict | None = None,
    data_summary: pd.DataFrame | None = None,
    comparison_table: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
    extra_plots: dict[str, Path] | None = None,
    extra_tables: dict[str, pd.DataFrame] | None = None,
) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (plots in ``run_dir/plots``) and return their paths.

    Sections: metrics (the given summary table: mean ± std over folds, pooled, bootstrap CIs), per-fold metrics,
    model comparison, ROC curves and confusion matrix of the pooled predictions, learning curves, data summary,
    notes and warnings (the per-fold and pooled metric warnings are added), resolved config (YAML), environment.
    ``extra_plots`` (heading -> PNG path inside ``run_dir``, e.g. from `plot_calibration`) are shown after the
    built-in plots (e.g. `plot_repeats`); ``extra_tables`` (heading -> table) after the built-in tables.
    The built-in tables are also saved at full precision as CSV in ``run_dir/tables``; extra tables are the caller's
    to save.
    """
    run_dir = Path(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    environment = environment if environment is not None else environment_info()

    y_true, probs = predictions_to_arrays(predictions, class_names)
    pooled = classification_metrics(y_true, probs, class_names)
    plots = {
        "ROC curves (pooled predictions)": plot_roc_curves(y_true, probs, class_names, plots_dir / "roc.png"),
        "Confusion matrix (pooled predictions)": plot_confusion_matrix(
            pooled["confusion_matrix"], class_names, plots_dir / "confusion_matrix.png", normalise=True),
    }
    if history is not None and len(history):
        plots["Learning curves"] = plot_learning_curves(history, plots_dir / "learning_curves.png")
    plots.update({heading: Path(path) for heading, path in (extra_plots or {}).items()})
    # Fold warnings belong with a per-fold table (a per-model report); a comparison report passes its own notes.
    has_folds = per_fold_table is not None and "fold" in predictions.columns
    metric_warnings = fold_warnings(predictions, class_names) if has_folds else []
    metric_warnings += [f"pooled: {note}" for note in pooled["warnings"]]
    all_notes = list(dict.fromkeys([*notes, *metric_warnings]))  # callers may already have passed fold warnings

    n_patients = predictions["patient_id"].nunique() if "patient_id" in predictions.columns else "unknown"
    n_folds = predictions["fold"].nunique() if "fold" in predictions.columns else "unknown"
    overview = (f"{len(predictions)} predictions from {n_patients} patients, {n_folds} folds; "
                f"classes: {', '.join(class_names)}.")
    named_tables = {"summary": summary_table, "per_fold": per_fold_table, "comparison": comparison_table,
                    "data_summary": data_summary}
    (run_dir / "tables").mkdir(exist_ok=True)
    for name, table in named_tables.items():
        if table is not None:
            table.to_csv(run_dir / "tables" / f"{name}.csv", index=False)
    tables = [("Metrics", summary_table), ("Per-fold metrics", per_fold_table),
              ("Model comparison", comparison_table), ("Data summary", data_summary),
              *(extra_tables or {}).items()]
    config_yaml = yaml.safe_dump(_plain(config or {}), sort_keys=False, allow_unicode=True)

    md_path = run_dir / "report.md"
    md_path.write_text(_markdown(title, overview, tables, plots, all_notes, config_yaml, environment, run_dir))
    html_path = run_dir / "report.html"
    html_path.write_text(_html(title, overview, tables, plots, all_notes, config_yaml, environment))
    return {"md": md_path, "html": html_path}


METRICS_EXPLAINED = (
    "mean ± std: over folds (sample standard deviation; n_folds = folds where the metric is defined). "
    "pooled: all out-of-fold predictions together, with a percentile bootstrap CI that resamples patients "
    "(n_boot_used = resamples where the metric was defined). Full-precision tables: tables/*.csv."
)


def _display_summary(summary: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The readable columns of a `tlese.evaluate.tables.summary_table` and their explanation; other tables as given."""
    ci_columns = [column for column in summary.columns if str(column).startswith("pooled (")]
    wanted = ["metric", "mean ± std", "n_folds", *ci_columns, "n_boot_used"]
    if ci_columns and all(column in summary.columns for column in wanted):
        return summary[wanted], METRICS_EXPLAINED
    return summary, None


def _markdown(title, overview, tables, plots, notes, config_yaml, environment, run_dir) -> str:
    parts = [f"# {title}", "", overview, ""]
    for heading, table in tables:
        if table is not None and len(table):
            table, explanation = _display_summary(table) if heading == "Metrics" else (table, None)
            parts += [f"## {heading}", ""]
            parts += [explanation, ""] if explanation else []
            parts += [markdown_table(_displayed(table)), ""]
    for heading, path in plots.items():
        parts += [f"## {heading}", "", f"![{heading}]({path.relative_to(run_dir).as_posix()})", ""]
    if notes:
        parts += ["## Notes and warnings", "", *(f"- {note}" for note in notes), ""]
    parts += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    parts += ["## Environment", "", markdown_table(_key_value_table(environment)), ""]
    return "\n".join(parts)


def _html(title, overview, tables, plots, notes, config_yaml, environment) -> str:
    escape = html.escape
    body = [f"<h1>{escape(title)}</h1>", f"<p>{escape(overview)}</p>"]
    for heading, table in tables:
        if table is not None and len(table):
            table, explanation = _display_summary(table) if heading == "Metrics" else (table, None)
            body += [f"<h2>{escape(heading)}</h2>"]
            body += [f"<p>{escape(explanation)}</p>"] if explanation else []
            body += [_html_table(_displayed(table))]  # whole, wrapping in its cells: never clipped
    for heading, path in plots.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        body += [f"<h2>{escape(heading)}</h2>",
                 f'<img alt="{escape(heading)}" src="data:image/png;base64,{encoded}">']
    if notes:
        items = "".join(f'<li class="warning">{escape(note)}</li>' for note in notes)
        body += ["<h2>Notes and warnings</h2>", f"<ul>{items}</ul>"]
    body += ["<h2>Configuration</h2>", f"<pre>{escape(config_yaml)}</pre>"]
    body += ["<h2>Environment</h2>", _html_table(_key_value_table(environment))]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
