"""The training engine: schedule, class weights, checkpoints, resume after a forced stop, determinism."""

from __future__ import annotations

import errno
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tlese.data.loader import split_key
from tlese.train import engine
from tlese.train.config import Recipe
from tlese.train.rundir import DONE


class Blobs(Dataset):
    """Two Gaussian classes of 1x8x8 images in [0, 1]; `.targets` as the engine expects."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.targets = (torch.arange(n) % 2).numpy()
        base = torch.rand(n, 1, 8, 8, generator=generator) * 0.5
        self.images = (base + torch.as_tensor(self.targets).view(-1, 1, 1, 1) * 0.4).clamp(0, 1)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, key):  # the training sampler gives (position, augmentation seed)
        index, _ = split_key(key)
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
    assert weights[0] < weights[1] and weights[2] == 1.0  # absent: finite validation loss, nothing to learn
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
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / DONE).exists()
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


def _weights(checkpoint) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Every epoch's order, augmentation seeds and global RNG come from (seed, epoch): resuming changes nothing."""
    torch.manual_seed(0)
    straight = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path / "straight", num_classes=2,
                          seed=5)
    for stop in (1, 3):
        folder = tmp_path / f"stopped_at_{stop}"
        torch.manual_seed(0)
        with pytest.raises(RuntimeError, match="simulated crash"):
            engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), folder, num_classes=2, seed=5,
                       extra_callbacks=[StopAt(stop)])
        torch.manual_seed(123)  # a different initial model: resuming must restore everything from the checkpoint
        resumed = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), folder, num_classes=2, seed=5)
        assert resumed.resumed_from is not None
        a, b = _weights(straight.last_checkpoint), _weights(resumed.last_checkpoint)
        assert all(torch.equal(a[key], b[key]) for key in a), f"resumed at epoch {stop} differs"


def test_sampler_draws_depend_on_seed_and_epoch_only():
    sampler = engine.EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    other = engine.EpochSampler(10, seed=3)
    list(other)  # an earlier epoch drawn first must not matter
    other.set_epoch(2)
    assert list(other) == first
    assert sorted(index for index, _ in first) == list(range(10))
    sampler.set_epoch(3)
    assert list(sampler) != first
    weighted = engine.EpochSampler(10, seed=3, weights=np.array([1.0] * 9 + [0.0]))
    assert 9 not in {index for index, _ in weighted}


def test_truncated_last_checkpoint_is_moved_aside_and_the_stage_retrained(tmp_path):
    torch.manual_seed(0)
    straight = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path / "straight", num_classes=2,
                          seed=1)
    folder = tmp_path / "damaged"
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), folder, num_classes=2, seed=1,
                   extra_callbacks=[StopAt(2)])
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # as a kill while it was written leaves it
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="unreadable"):
        result = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), folder, num_classes=2, seed=1)
    assert result.resumed_from is None and list(folder.glob("checkpoints/last.ckpt.unreadable-*"))
    a, b = _weights(straight.last_checkpoint), _weights(result.last_checkpoint)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_class_missing_from_training_warns_and_validation_loss_stays_finite(tmp_path):
    class OnlyZeros(Blobs):
        def __init__(self, n, seed):
            super().__init__(n, seed)
            self.targets = np.zeros(n, dtype=int)

    with pytest.warns(UserWarning, match="no training example"):
        result = engine.fit(tiny_model(), OnlyZeros(32, 0), Blobs(16, 1), recipe(epochs=2), tmp_path, num_classes=2,
                            seed=0)
    assert result.history["val_loss"].notna().all() and np.isfinite(result.history["val_loss"]).all()
    assert len(result.history) == 2  # early stopping did not end training on a NaN


def test_selected_epoch_is_the_checkpointed_one(tmp_path):
    torch.manual_seed(0)
    result = engine.fit(tiny_model(), Blobs(48, 0), Blobs(16, 1), recipe(), tmp_path, num_classes=2, seed=0)
    chosen = result.selected
    history = result.history.set_index("epoch")
    assert chosen["epoch"] == int(history["val_loss"].idxmin())
    assert chosen["val_acc"] == pytest.approx(history.loc[chosen["epoch"], "val_acc"])
    assert chosen["epoch"] == torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["epoch"]


class CtrlC(pl.Callback):
    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_says_what_was_saved(tmp_path):
    with pytest.raises(engine.TrainingInterrupted) as caught:
        engine.fit(tiny_model(), Blobs(32, 0), Blobs(8, 1), recipe(), tmp_path, num_classes=2, seed=0,
                   extra_callbacks=[CtrlC()])
    assert caught.value.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert "last checkpoint" in str(caught.value)


def test_logs_without_a_terminal_get_one_complete_line_per_epoch(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tlese.train.engine"):
        engine.fit(tiny_model(), Blobs(32, 0), Blobs(8, 1), recipe(epochs=2), tmp_path / "stage", num_classes=2, seed=0)
    lines = [record.getMessage() for record in caplog.records if "stage epoch " in record.getMessage()]
    assert len(lines) == 2 and "stage epoch 1/2: " in lines[0]
    assert all("train_loss" in line and "val_loss" in line and "val_acc" in line for line in lines), lines


class FullDiskFrom(pl.Callback):
    """From epoch `epoch` on, every fsync fails as on a full disk (checkpoints are written, then synced)."""

    def __init__(self, epoch: int, monkeypatch):
        self.epoch, self.monkeypatch = epoch, monkeypatch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            def fsync(descriptor):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            self.monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_keeps_the_last_whole_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    with pytest.raises(OSError) as caught:
        engine.fit(tiny_model(), Blobs(32, 0), Blobs(8, 1), recipe(epochs=3), tmp_path, num_classes=2, seed=0,
                   extra_callbacks=[FullDiskFrom(1, monkeypatch)])
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert caught.value.filename.startswith(str(tmp_path / "checkpoints")) and caught.value.filename.endswith(".ckpt")
    assert "No space left on device" in message
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial file
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (tmp_path / DONE).exists()
    # With space again, the same call resumes from the whole checkpoint and finishes.
    result = engine.fit(tiny_model(), Blobs(32, 0), Blobs(8, 1), recipe(epochs=3), tmp_path, num_classes=2, seed=0)
    assert result.resumed_from == checkpoints / "last.ckpt" and list(result.history["epoch"]) == [0, 1, 2]


def test_checkpoints_carry_the_model_spec(tmp_path):
    from tlese.models.spec import CHECKPOINT_KEY, ModelSpec

    spec = ModelSpec("tiny", {"num_classes": 2}, ["a", "b"], {"size": 8})
    result = engine.fit(tiny_model(), Blobs(16, 0), Blobs(8, 1), recipe(epochs=1), tmp_path, num_classes=2, seed=0,
                        spec=spec)
    for checkpoint in (result.best_checkpoint, result.last_checkpoint):
        assert torch.load(checkpoint, map_location="cpu", weights_only=True)[CHECKPOINT_KEY] == spec.to_dict()
    engine.load_trained_weights(tiny_model(), result.best_checkpoint, spec)
    with pytest.raises(ValueError, match="holds another model"):
        engine.load_trained_weights(tiny_model(), result.best_checkpoint, ModelSpec("tiny", {}, ["a", "c"]))
