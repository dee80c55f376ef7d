"""Trained models of a run folder: a fold's model rebuilt from the spec its record carries (for explain and the
bundle maker), and Grad-CAM overlays of held-out cases (`tlese explain`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tlese.train.runs import FinishedRun, TrainedFold

__all__ = ["INDEX_COLUMNS", "TrainedFold", "explain_fold", "load_trained"]

INDEX_COLUMNS = ["file", "patient_id", "side", "view", "true", "predicted", "probability"]


def load_trained(run_dir: str | Path, arm_name: str, fold: int, overrides: list[str] | None = None) -> TrainedFold:
    """Rebuild fold `fold`'s model of the arm from the model spec its record carries (not from the run's config, which
    may have been edited since) and load the checkpoint the fold predicted with (verified against its recorded
    checksum). The model is in eval mode, on the CPU. `overrides` (`key=value`) change the reloaded config only (e.g.
    where the data moved), never the model."""
    return FinishedRun(run_dir, overrides).trained(arm_name, fold)


def explain_fold(run_dir: str | Path, arm_name: str, fold: int, per_class: int = 2, layer: str | None = None,
                 out_dir: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Grad-CAM overlays for held-out cases of one fold of a cross-validation run, with the fold's selected checkpoint.

    Per true class, the `per_class` test cases (breasts for dual-view runs, images otherwise) with the most confident
    predictions are explained for their predicted class: right and wrong calls alike. The test patients are the ones
    the fold recorded in its split, and the checkpoint the one it predicted with. Writes PNGs and `index.csv` (file,
    patient_id, side, view, true, predicted, probability) into `out_dir` (default `<run>/<arm>/fold_<k>/gradcam`)
    and returns that folder. Needs the run's data and prepared cache; `overrides` (`key=value`, as for
    `tlese cv --set`) point at data that has moved.
    """
    from tlese.evaluate.explain import grad_cam, save_overlay
    from tlese.train import engine
    from tlese.train.data import make_dataset, prepare

    trained = FinishedRun(run_dir, overrides).trained(arm_name, fold)
    experiment, model, fold_dir = trained.experiment, trained.model, trained.fold_dir
    test_patients = fold_dir.test_patients()
    data = prepare(experiment.target, experiment, preprocess=trained.spec.preprocess)  # as the fold trained
    test = data.table[data.table["patient_id"].astype(str).isin(test_patients)]
    if test.empty:
        raise ValueError(f"{fold_dir.split_file}: none of its {len(test_patients)} test patients is in the data of "
                         f"{experiment.target.root}")
    views = trained.spec.views
    dataset = make_dataset(test, views, data.task.modality, train=False, recipe=experiment.target_recipe)
    rows = dataset.breasts if views == "dual" else dataset.table.reset_index(drop=True)
    probabilities = engine.predict_probs(model, dataset, experiment.target_recipe.batch_size, device="cpu")
    cases = rows[["patient_id", "side"]].assign(
        view="breast" if views == "dual" else rows.get("view", ""), true=rows["target"].to_numpy(),
        predicted=probabilities.argmax(axis=1), probability=probabilities.max(axis=1))
    chosen = (cases.sort_values(["true", "probability"], ascending=[True, False], kind="stable")
              .groupby("true", sort=True).head(per_class))
    classes = trained.class_names
    out_dir = Path(out_dir) if out_dir else fold_dir.path / "gradcam"
    view_names = [str(getattr(v, "value", v)) for v in getattr(dataset, "views", ())] or None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for position, case in chosen.iterrows():
        images = dataset[int(position)][0][None]  # (1, [V,] C, H, W)
        maps, _ = grad_cam(model, images, class_index=int(case["predicted"]), layer=layer)
        pixels = images[0, ..., 0, :, :] if images.ndim == 5 else images[0, 0]
        # The position keeps names unique where a patient has several images of one side and view (chest X-rays).
        name = f"{case['patient_id']}_{case['side']}_{case['view']}_{position}.png".replace("/", "_")
        verdict = "right" if case["true"] == case["predicted"] else "wrong"
        title = (f"{case['patient_id']} {case['side']}: true {classes[int(case['true'])]}, predicted "
                 f"{classes[int(case['predicted'])]} ({case['probability']:.2f}, {verdict}); "
                 "map for the predicted class")
        save_overlay(pixels.numpy(), maps[0].numpy(), out_dir / name, title=title, view_names=view_names)
        written.append({"file": name, "patient_id": case["patient_id"], "side": case["side"], "view": case["view"],
                        "true": classes[int(case["true"])], "predicted": classes[int(case["predicted"])],
                        "probability": round(float(case["probability"]), 4)})
    pd.DataFrame(written, columns=INDEX_COLUMNS).to_csv(out_dir / "index.csv", index=False)
    return out_dir
