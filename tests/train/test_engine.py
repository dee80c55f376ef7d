"""The training engine: schedule, class weights, checkpoints, resume after a forced stop, determinism."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tlese.train import engine
from tlese.train.config import Recipe


class Blobs(Dataset):
    """Two Gaussian classes of 1x8x8 images in [0, 1]; `.targets` as the engine expects."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % 2).numpy()
        base = torch.rand(n, 1, 8, 8, generator=generator) * 0.5
        self.images = (base + torch.as_tensor(self.targets).view(-1, 1, 1, 1) * 0.4).clamp(0, 1)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index]), index


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def recipe(**overrides) -> Recipe:
    values = dict(epochs=4, batch_size=8, lr=0.05, warmup_epochs=0.5, early_stopping_patience=10, progress_bar=False,
                  accelerator="cpu")
    values.update(overrides)
    return Recipe(**values)


def test_warmup_cosine_shape():
    values = [engine.warmup_cosine(step, 10, 100) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay after warm-up
    assert values[-1] < 0.01


def test_class_weights_inverse_frequency_and_absent_class():
    targets = np.array([0, 0, 0, 1])
    weights = engine.class_weights_from_targets(targets, 3).numpy()
    assert weights[0] < weights[1] and weights[2] == 0.0
    assert weights[targets].mean() == pytest.approx(1.0)  # the loss keeps its scale


def test_fit_writes_checkpoints_history_and_learns(tmp_path):
    torch.manual_seed(0)
    result = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path, num_classes=2, seed=0)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    assert list(result.history["epoch"]) == [0, 1, 2, 3]
    model = engine.load_trained_weights(tiny_model(), result.best_checkpoint)
    probs = engine.predict_probs(model, Blobs(16, 2), device="cpu")
    assert probs.shape == (16, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == Blobs(16, 2).targets).mean() >= 0.75


class StopAt(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_after_forced_stop_continues_from_last_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path, num_classes=2, seed=0,
                   extra_callbacks=[StopAt(2)])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / engine.DONE_MARKER).exists()
    result = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path, num_classes=2, seed=0)
    assert result.resumed_from == tmp_path / "checkpoints" / "last.ckpt"
    assert list(result.history["epoch"]) == [0, 1, 2, 3]
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert state["epoch"] == 3
    # A finished stage is not trained again.
    again = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path, num_classes=2, seed=0)
    assert again.epochs_run == 0 and again.best_checkpoint == result.best_checkpoint


def test_same_seed_same_weights_on_cpu(tmp_path):
    runs = []
    for name in ("a", "b"):
        torch.manual_seed(0)  # model initialisation is the caller's (the CV runner seeds before creating models)
        result = engine.fit(tiny_model(), Blobs(32, 0), Blobs(8, 1), recipe(epochs=2, class_balance="sampler"),
                            tmp_path / name, num_classes=2, seed=3)
        runs.append(torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
