"""One training engine for every stage, on PyTorch Lightning.

Lightning gives us, well tested: DDP on one or many nodes (`strategy="ddp"`, or torchrun), mixed precision, checkpoints
and resume, early stopping, CSV/TensorBoard logs and the progress bar. What is ours: the classification module, the
warm-up + cosine schedule, class balancing, epoch-seeded sampling (resumed == uninterrupted), and the rule that model
selection only ever sees the internal validation split. Every checkpoint carries the spec of the model it holds
(`tlese.models.spec.CHECKPOINT_KEY`) and is written atomically: a full disk leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from tlese.files import sha256_file
from tlese.models.spec import CHECKPOINT_KEY, ModelSpec
from tlese.train.config import Recipe
from tlese.train.rundir import StageDir, save_bytes, save_json

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: what was saved and where training resumes."""

    def __init__(self, stage_dir: Path, last_checkpoint: Path | None):
        self.stage_dir, self.last_checkpoint = stage_dir, last_checkpoint
        saved = f"last checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint of this stage yet"
        super().__init__(f"interrupted while training {stage_dir} ({saved}); finished stages and folds are kept")


@dataclass
class FitResult:
    """Where a finished stage left its artefacts."""

    best_checkpoint: Path
    last_checkpoint: Path
    history: pd.DataFrame
    resumed_from: Path | None
    epochs_run: int
    world_size: int | None = 1  # processes that trained it (DDP); None: finished before this was recorded
    selected: dict | None = None  # epoch and validation metrics of the selected (best) checkpoint


def macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUC over the classes present with positives and negatives; NaN when none are."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for k in range(probs.shape[1]):
        positives = targets == k
        if positives.any() and (~positives).any():
            aucs.append(roc_auc_score(positives, probs[:, k]))
    return float(np.mean(aucs)) if aucs else float("nan")


def class_weights_from_targets(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, scaled so the mean weight over samples is 1.

    A class absent from training gets weight 1: it has nothing to learn from, but a validation split holding it must
    still give a finite, meaningful loss (weight 0 made a validation batch of that class 0/0 = NaN).
    """
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to zero at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification of any `tlese` model; logs loss, accuracy and macro AUC."""

    def __init__(self, model: nn.Module, num_classes: int, recipe: Recipe, class_weights: torch.Tensor | None,
                 spec: ModelSpec | None = None):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.recipe = recipe
        self.spec = spec
        self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.label_smoothing)
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.channels_last = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.spec is not None:  # the checkpoint knows its model: registry name, arguments, classes, input
            checkpoint[CHECKPOINT_KEY] = _plain(self.spec.to_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch[0], batch[1]
        loss = self.loss(self(images), targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step} (the model diverged: "
                                     "lower the learning rate)")
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets),
                 sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch[0], batch[1]
        logits = self(images)
        self._val_outputs.append((logits.float().detach(), targets.detach()))

    def on_validation_epoch_end(self):
        if not self._val_outputs:
            return
        # Validation is not sharded (every rank sees the whole split), so these are the full split's numbers.
        logits = torch.cat([output for output, _ in self._val_outputs])
        targets = torch.cat([target for _, target in self._val_outputs])
        self._val_outputs.clear()
        loss = self.loss(logits, targets)  # over the whole split: batch-wise means weight small batches wrongly
        if not torch.isfinite(loss):
            raise FloatingPointError(f"validation loss is not finite at epoch {self.current_epoch}")
        probs_np, targets_np = torch.softmax(logits, dim=1).cpu().numpy(), targets.cpu().numpy()
        auc = macro_auc(targets_np, probs_np)
        # NaN AUC (a validation split without two classes) must not win model selection: log it as 0.
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_auc", 0.0 if math.isnan(auc) else auc, prog_bar=True)
        self.log("val_acc", float((probs_np.argmax(1) == targets_np).mean()), prog_bar=True)

    def configure_optimizers(self):
        recipe = self.recipe
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                # Norm and bias parameters are not decayed (standard for BN-heavy CNNs).
                (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if recipe.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs))
        warmup_steps = int(round(recipe.warmup_epochs * steps_per_epoch))
        if recipe.scheduler == "constant":
            schedule = lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0  # noqa: E731
        else:
            schedule = lambda step: warmup_cosine(step, warmup_steps, total_steps)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, then renamed over it: a full disk or a kill leaves
    the previous checkpoint (or none), never a truncated one, and the error names the file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        save_bytes(path, buffer.getbuffer())


class EpochSampler(Sampler):
    """Training order and one augmentation seed per item, drawn from (seed, epoch) alone.

    Nothing carries over from one epoch to the next, so a run resumed after a kill replays exactly the epochs of an
    uninterrupted run. With class weights, items are drawn with replacement (balanced sampling). Under DDP each rank
    takes every world_size-th item (padded to equal length), so Lightning's sampler replacement is turned off.
    """

    def __init__(self, size: int, seed: int, weights: np.ndarray | None = None):
        self.size, self.seed, self.epoch = size, int(seed), 0
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before every epoch
        self.epoch = int(epoch)

    @staticmethod
    def _rank_and_world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return math.ceil(self.size / self._rank_and_world()[1])

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            order = rng.permutation(self.size)
        else:
            order = rng.choice(self.size, size=self.size, replace=True, p=self.weights)
        seeds = rng.integers(0, 2**62, size=self.size)
        rank, world = self._rank_and_world()
        padded = np.resize(np.arange(self.size), len(self) * world)  # wraps around to give every rank len(self)
        for position in padded[rank::world]:
            yield int(order[position]), int(seeds[position])


class _EpochSeeding(pl.Callback):
    """Reseed torch, NumPy and Python at each epoch's start from (seed, epoch): dropout and anything else drawn from
    the global generators then do not depend on whether the run was resumed."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        import random

        value = (self.seed * 1_000_003 + trainer.current_epoch) % (2**31)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


class _EpochLog(pl.Callback):
    """One line per epoch, for logs that are not a terminal (where a progress bar would write thousands of frames)."""

    def __init__(self, name: str):
        self.name = name

    def on_train_epoch_end(self, trainer, pl_module):
        # Here (not at validation end, where callbacks run before the module logs) both this epoch's training loss
        # and its validation metrics are in callback_metrics.
        if not trainer.is_global_zero:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key in ("train_loss", "val_loss", "val_acc", "val_auc")}
        shown = " ".join(f"{key} {value:.4f}" for key, value in sorted(metrics.items()))
        log.info("%s epoch %d/%d: %s", self.name, trainer.current_epoch + 1, trainer.max_epochs, shown)


def _targets_of(dataset: Dataset) -> np.ndarray:
    return np.asarray(dataset.targets, dtype=np.int64)


def _on_gpu(recipe: Recipe) -> bool:
    return recipe.accelerator in ("gpu", "cuda") or (recipe.accelerator == "auto" and torch.cuda.is_available())


def make_train_loader(dataset: Dataset, recipe: Recipe, num_classes: int, seed: int) -> DataLoader:
    weights = None
    if recipe.class_balance == "sampler":
        targets = _targets_of(dataset)
        weights = class_weights_from_targets(targets, num_classes).numpy()[targets]
    sampler = EpochSampler(len(dataset), seed, weights)
    # Workers are made anew each epoch (not persistent) so that each starts from the sampler's seeds alone.
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=recipe.num_workers,
                      drop_last=len(dataset) > recipe.batch_size, pin_memory=_on_gpu(recipe))


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _show_progress(recipe: Recipe) -> bool:
    return bool(recipe.progress_bar) and sys.stderr.isatty()


def _usable_resume_point(stage: StageDir) -> Path | None:
    """`last.ckpt` if it loads; a damaged one (a kill while it was written) is moved aside with a warning and the stage
    starts over, which gives the same result because every epoch is seeded by its number."""
    last = stage.last_checkpoint
    if not last.is_file():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, bad pickle: whatever it is, it cannot be resumed from
        aside = last.with_name(f"last.ckpt.unreadable-{int(time.time())}")
        os.replace(last, aside)
        warnings.warn(f"{last}: unreadable ({type(error).__name__}: {error}); moved to {aside.name}, "
                      "training this stage again from its first epoch", stacklevel=3)
        return None
    return last


def _warn_missing_classes(train_targets: np.ndarray, val_targets: np.ndarray, num_classes: int, out_dir: Path) -> None:
    absent = sorted(set(range(num_classes)) - set(train_targets.tolist()))
    in_val = sorted(set(val_targets.tolist()) & set(absent))
    if absent:
        warnings.warn(f"{out_dir}: class(es) {absent} have no training example"
                      + (f"; validation holds class(es) {in_val}, which the model cannot learn" if in_val else ""),
                      UserWarning, stacklevel=3)


def _selected_epoch(best_path: Path, history: pd.DataFrame, monitor: str) -> dict:
    """Epoch and validation metrics of the checkpoint that was selected (not the best of each metric)."""
    if not best_path.is_file():
        return {}
    epoch = int(torch.load(best_path, map_location="cpu", weights_only=False).get("epoch", -1))
    row = history.loc[history["epoch"] == epoch] if "epoch" in history else history.iloc[0:0]
    chosen = {"epoch": epoch, "monitor": monitor}
    if len(row):
        for key in ("val_loss", "val_acc", "val_auc"):
            if key in row and pd.notna(row[key].iloc[-1]):
                chosen[key] = float(row[key].iloc[-1])
    return chosen


def _module(model: nn.Module, train_targets: np.ndarray, recipe: Recipe, num_classes: int,
            spec: ModelSpec | None) -> ClassificationModule:
    class_weights = None
    if recipe.class_balance == "loss_weights":
        class_weights = class_weights_from_targets(train_targets, num_classes)
    module = ClassificationModule(model, num_classes, recipe, class_weights, spec)
    if _on_gpu(recipe) and recipe.channels_last in ("auto", "true", "on"):
        module.channels_last = True
        module.model.to(memory_format=torch.channels_last)
    return module


def _trainer(recipe: Recipe, out_dir: Path, seed: int, extra_callbacks: list | None) -> tuple[pl.Trainer, object]:
    """The Lightning trainer of a stage, and its best-checkpoint callback."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    mode = "min" if recipe.monitor == "val_loss" else "max"
    best = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor=recipe.monitor, mode=mode,
                           save_last=True, save_top_k=1, enable_version_counter=False)
    callbacks = [best, EarlyStopping(monitor=recipe.monitor, mode=mode, patience=recipe.early_stopping_patience),
                 _EpochSeeding(seed), *(extra_callbacks or [])]
    show_progress = _show_progress(recipe)
    if not show_progress:
        callbacks.append(_EpochLog("/".join(out_dir.parts[-2:])))
    loggers = [CSVLogger(out_dir, name="logs")]
    try:
        import tensorboard  # noqa: F401  (optional extra)
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    except ImportError:
        pass
    on_gpu = _on_gpu(recipe)
    precision = recipe.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    trainer = pl.Trainer(
        max_epochs=recipe.epochs, accelerator=recipe.accelerator, devices=recipe.devices,
        num_nodes=recipe.num_nodes, strategy=recipe.strategy, precision=precision, callbacks=callbacks,
        logger=loggers, plugins=_plugins(), limit_train_batches=recipe.limit_train_batches,
        enable_progress_bar=show_progress,
        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        deterministic="warn" if on_gpu else True, default_root_dir=out_dir,
        use_distributed_sampler=False,  # EpochSampler shards by rank itself; validation is not sharded
    )
    return trainer, best


def _plugins() -> list:
    """Atomic checkpoint writes; inside a SLURM job, Lightning's SLURM environment WITHOUT its auto-requeue: a SIGUSR1
    sent to every job step would make Lightning save a mid-epoch `hpc_ckpt` and resume from it, which is not exact.
    The job script (`tlese.cluster`) traps the signal and requeues itself; the new attempt resumes from `last.ckpt`
    at an epoch boundary, which is."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    # Where SLURM is installed but this is no SLURM job, Lightning advises `srun` at every stage: noise, not advice.
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _run(trainer: pl.Trainer, module: ClassificationModule, loaders: tuple, stage: StageDir,
         resumed_from: Path | None) -> None:
    with warnings.catch_warnings():
        # Lightning's advice about dataloader workers and small logging intervals is noise at our sizes.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Resuming writes into the same checkpoint folder by design.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        # Lightning 2.x on torch >= 2.10 calls a deprecated torch pytree API: not ours to fix, repeated every step.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        try:
            trainer.fit(module, train_dataloaders=loaders[0], val_dataloaders=loaders[1],
                        ckpt_path=str(resumed_from) if resumed_from else None)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1) after ignoring further SIGINTs: say what was kept instead.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if trainer.interrupted:
                last = stage.last_checkpoint
                raise TrainingInterrupted(stage.path, last if last.is_file() else None) from None
            raise


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, recipe: Recipe, out_dir: str | Path, *,
        num_classes: int, seed: int, resume: bool = True, extra_callbacks: list | None = None,
        spec: ModelSpec | None = None) -> FitResult:
    """Train `model` on `train_set`, select on `val_set` (carved from training data only), save best/last checkpoints
    (each carrying `spec`, the model's spec, when given).

    A stage that already finished (its `done.json` exists) is not trained again; one that was interrupted resumes from
    `checkpoints/last.ckpt` and ends exactly as an uninterrupted run would. Returns paths and the per-epoch history.
    """
    stage = StageDir(Path(out_dir))
    if resume and stage.is_done():
        info = stage.done()
        best = stage.best_checkpoint()  # verified against its recorded checksum
        return FitResult(best, stage.last_checkpoint, read_history(stage.path), resumed_from=None, epochs_run=0,
                         world_size=info.get("world_size"), selected=info.get("selected"))

    pl.seed_everything(seed, workers=True, verbose=False)
    train_targets = _targets_of(train_set)
    _warn_missing_classes(train_targets, _targets_of(val_set), num_classes, stage.path)
    module = _module(model, train_targets, recipe, num_classes, spec)
    trainer, best = _trainer(recipe, stage.path, seed, extra_callbacks)
    resumed_from = _usable_resume_point(stage) if resume else None
    loaders = (make_train_loader(train_set, recipe, num_classes, seed),
               make_eval_loader(val_set, recipe.batch_size, recipe.num_workers))
    _run(trainer, module, loaders, stage, resumed_from)

    best_path = Path(best.best_model_path) if best.best_model_path else stage.last_checkpoint
    history = read_history(stage.path)
    selected = _selected_epoch(best_path, history, recipe.monitor)
    if trainer.is_global_zero:
        save_json(stage.done_file, {
            "best_checkpoint": best_path.name, "best_sha256": sha256_file(best_path), "epochs": trainer.current_epoch,
            "best_score": _as_float(best.best_model_score), "selected": selected, "world_size": trainer.world_size,
            "resumed_from": resumed_from.name if resumed_from else None})
    return FitResult(best_path, stage.last_checkpoint, history, resumed_from, trainer.current_epoch,
                     trainer.world_size, selected)


def _plain(value: dict) -> dict:
    """The JSON form of a spec dict (tuples as lists), as fold records hold it: equal specs compare equal."""
    return json.loads(json.dumps(value))


def _as_float(value) -> float | None:
    return None if value is None else float(value)


def _read_log(path: Path) -> pd.DataFrame:
    """One attempt's CSV log. Lightning rewrites the file when a new metric appears, so an attempt killed mid-write can
    leave rows longer than the header: those rows are skipped with a warning (a resumed attempt logs its own)."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        warnings.warn(f"{path}: damaged log of an interrupted attempt ({error}); its unreadable rows are skipped",
                      stacklevel=2)
        try:
            return pd.read_csv(path, on_bad_lines="skip", engine="python")
        except pd.errors.EmptyDataError:
            return pd.DataFrame(columns=["epoch"])


def read_history(out_dir: str | Path) -> pd.DataFrame:
    """Per-epoch metrics from every CSV log of a stage (one per attempt when resumed), last attempt winning."""
    frames = [_read_log(path) for path in sorted(Path(out_dir).glob("logs/version_*/metrics.csv"))]
    if not frames:
        return pd.DataFrame(columns=["epoch"])
    merged = pd.concat(frames, ignore_index=True)
    keep = [c for c in ("train_loss", "val_loss", "val_auc", "val_acc") if c in merged.columns]
    history = merged.groupby("epoch")[keep].last().reset_index()
    return history


def load_trained_weights(model: nn.Module, checkpoint: str | Path, spec: ModelSpec | None = None) -> nn.Module:
    """Load a Lightning checkpoint of this engine into a bare model (strict: same architecture). With `spec`, the
    spec the checkpoint carries (when it carries one) must be the same."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    carried = saved.get(CHECKPOINT_KEY)
    if spec is not None and carried is not None and _plain(carried) != _plain(spec.to_dict()):
        raise ValueError(f"{checkpoint}: holds another model ({carried}) than its record says ({spec.to_dict()})")
    state = saved["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


@torch.no_grad()
def predict_probs(model: nn.Module, dataset: Dataset, batch_size: int = 32, device: str | None = None) -> np.ndarray:
    """Softmax probabilities for every item of `dataset`, in order."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    outputs = []
    for batch in make_eval_loader(dataset, batch_size):
        outputs.append(torch.softmax(model(batch[0].to(device)).float(), dim=1).cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)
