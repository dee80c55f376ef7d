"""One training engine for every stage, on PyTorch Lightning.

Lightning gives us, well tested: DDP on one or many nodes (`strategy="ddp"`, or torchrun), mixed precision, checkpoints
and resume, early stopping, CSV/TensorBoard logs and the progress bar. What is ours: the classification module, the
warm-up + cosine schedule, class balancing, and the rule that model selection only ever sees the internal validation split.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from tlese.train.config import Recipe

DONE_MARKER = "done.json"


@dataclass
class FitResult:
    """Where a finished stage left its artefacts."""

    best_checkpoint: Path
    last_checkpoint: Path
    history: pd.DataFrame
    resumed_from: Path | None
    epochs_run: int
    world_size: int | None = 1  # processes that trained it (DDP); None: finished before this was recorded


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
    """Inverse-frequency weights, scaled so the mean weight over samples is 1; an absent class gets 0 (nothing to learn)."""
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to zero at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _lightning_module_class():
    import lightning.pytorch as pl

    class ClassificationModule(pl.LightningModule):
        """Cross-entropy classification of any `tlese` model; logs loss, accuracy and macro AUC."""

        def __init__(self, model: nn.Module, num_classes: int, recipe: Recipe, class_weights: torch.Tensor | None):
            super().__init__()
            self.model = model
            self.num_classes = num_classes
            self.recipe = recipe
            self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.label_smoothing)
            self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.channels_last = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x)

        def training_step(self, batch, batch_idx):
            images, targets = batch[0], batch[1]
            logits = self(images)
            loss = self.loss(logits, targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets), sync_dist=True)
            return loss

        def validation_step(self, batch, batch_idx):
            images, targets = batch[0], batch[1]
            logits = self(images)
            loss = self.loss(logits, targets)
            self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets), sync_dist=True)
            self._val_outputs.append((torch.softmax(logits.float(), dim=1).detach(), targets.detach()))

        def on_validation_epoch_end(self):
            if not self._val_outputs:
                return
            probs = torch.cat([p for p, _ in self._val_outputs])
            targets = torch.cat([t for _, t in self._val_outputs])
            self._val_outputs.clear()
            if self.trainer.world_size > 1:  # every rank must see the whole validation set for AUC
                probs = self.all_gather(probs).reshape(-1, probs.shape[-1])
                targets = self.all_gather(targets).reshape(-1)
            probs_np, targets_np = probs.cpu().numpy(), targets.cpu().numpy()
            auc = macro_auc(targets_np, probs_np)
            accuracy = float((probs_np.argmax(1) == targets_np).mean())
            # NaN AUC (a validation split without two classes) must not win model selection: log it as 0.
            self.log("val_auc", 0.0 if math.isnan(auc) else auc, prog_bar=True, rank_zero_only=False)
            self.log("val_acc", accuracy, prog_bar=True)

        def configure_optimizers(self):
            recipe = self.recipe
            decay, no_decay = [], []
            for name, parameter in self.model.named_parameters():
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

    return ClassificationModule


def _targets_of(dataset: Dataset) -> np.ndarray:
    from tlese.train.data import dataset_targets

    return dataset_targets(dataset)


def _on_gpu(recipe: Recipe) -> bool:
    return recipe.accelerator in ("gpu", "cuda") or (recipe.accelerator == "auto" and torch.cuda.is_available())


def make_train_loader(dataset: Dataset, recipe: Recipe, num_classes: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if recipe.class_balance == "sampler":
        targets = _targets_of(dataset)
        per_class = class_weights_from_targets(targets, num_classes).numpy()
        sampler = WeightedRandomSampler(per_class[targets], num_samples=len(targets), replacement=True, generator=generator)
    return DataLoader(dataset, batch_size=recipe.batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=recipe.num_workers, generator=generator, drop_last=len(dataset) > recipe.batch_size,
                      persistent_workers=recipe.num_workers > 0, pin_memory=_on_gpu(recipe))


def make_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def fit(model: nn.Module, train_set: Dataset, val_set: Dataset, recipe: Recipe, out_dir: str | Path, *,
        num_classes: int, seed: int, resume: bool = True, extra_callbacks: list | None = None) -> FitResult:
    """Train `model` on `train_set`, select on `val_set` (carved from training data only), save best/last checkpoints.

    A stage that already finished (its `done.json` exists) is not trained again; one that was interrupted resumes from
    `checkpoints/last.ckpt`. Returns paths and the per-epoch history.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    done = out_dir / DONE_MARKER
    if resume and done.is_file():
        info = json.loads(done.read_text())
        return FitResult(Path(info["best_checkpoint"]), Path(info["last_checkpoint"]), read_history(out_dir),
                         resumed_from=None, epochs_run=0, world_size=info.get("world_size"))

    pl.seed_everything(seed, workers=True, verbose=False)
    on_gpu = _on_gpu(recipe)
    class_weights = None
    if recipe.class_balance == "loss_weights":
        class_weights = class_weights_from_targets(_targets_of(train_set), num_classes)
    module = _lightning_module_class()(model, num_classes, recipe, class_weights)
    if on_gpu and recipe.channels_last in ("auto", "true", "on"):
        module.channels_last = True
        module.model.to(memory_format=torch.channels_last)

    mode = "min" if recipe.monitor == "val_loss" else "max"
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=recipe.monitor, mode=mode, save_last=True,
                           save_top_k=1, enable_version_counter=False)
    callbacks = [best, EarlyStopping(monitor=recipe.monitor, mode=mode, patience=recipe.early_stopping_patience)]
    loggers = [CSVLogger(out_dir, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401  (optional extra)

        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    except ImportError:
        pass
    precision = recipe.precision
    if precision == "auto":
        precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if on_gpu else "32-true"
    with warnings.catch_warnings():
        # Lightning's advice about dataloader workers and small logging intervals is noise at our sizes.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Lightning 2.x on torch >= 2.10 calls a deprecated torch pytree API: not ours to fix, repeated every step.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        trainer = pl.Trainer(
            max_epochs=recipe.epochs, accelerator=recipe.accelerator, devices=recipe.devices,
            num_nodes=recipe.num_nodes, strategy=recipe.strategy, precision=precision,
            callbacks=callbacks + list(extra_callbacks or []), logger=loggers,
            limit_train_batches=recipe.limit_train_batches, enable_progress_bar=recipe.progress_bar,
            enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
            deterministic="warn" if on_gpu else True, default_root_dir=out_dir,
        )
        last = checkpoint_dir / "last.ckpt"
        resumed_from = last if resume and last.is_file() else None
        trainer.fit(module, train_dataloaders=make_train_loader(train_set, recipe, num_classes, seed),
                    val_dataloaders=make_eval_loader(val_set, recipe.batch_size, recipe.num_workers),
                    ckpt_path=str(resumed_from) if resumed_from else None)
    best_path = Path(best.best_model_path) if best.best_model_path else last
    result = FitResult(best_path, last, read_history(out_dir), resumed_from, trainer.current_epoch, trainer.world_size)
    if trainer.is_global_zero:
        done.write_text(json.dumps({"best_checkpoint": str(best_path), "last_checkpoint": str(last),
                                    "epochs": trainer.current_epoch, "best_score": _as_float(best.best_model_score),
                                    "world_size": trainer.world_size}))
    return result


def _as_float(value) -> float | None:
    return None if value is None else float(value)


def read_history(out_dir: str | Path) -> pd.DataFrame:
    """Per-epoch metrics from every CSV log of a stage (one per attempt when resumed), last attempt winning."""
    frames = [pd.read_csv(path) for path in sorted(Path(out_dir).glob("logs/version_*/metrics.csv"))]
    if not frames:
        return pd.DataFrame(columns=["epoch"])
    merged = pd.concat(frames, ignore_index=True)
    keep = [c for c in ("train_loss", "val_loss", "val_auc", "val_acc") if c in merged.columns]
    history = merged.groupby("epoch")[keep].last().reset_index()
    return history


def load_trained_weights(model: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a Lightning checkpoint of this engine into a bare model (strict: same architecture)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
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
