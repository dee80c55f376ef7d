"""Augmentation: identity at eval, seeded, shape/range kept, mammograms never flipped left-right."""

from __future__ import annotations

import pytest
import torch

from tlese.data.transforms import build_transforms


def _breast(height=64, width=48):
    """Bright block against the left edge (a breast facing the common side)."""
    image = torch.zeros(1, height, width)
    image[:, 8:56, :20] = 0.8
    return image


def test_eval_is_identity():
    image = torch.rand(1, 16, 16)
    for modality in ("mammo", "cxr"):
        assert torch.equal(build_transforms(modality, train=False)(image), image)


@pytest.mark.parametrize("modality", ["mammo", "cxr"])
def test_train_keeps_shape_and_range(modality):
    transform = build_transforms(modality, train=True, seed=0)
    for shape in [(1, 32, 24), (2, 1, 32, 24)]:
        out = transform(torch.rand(shape))
        assert out.shape == shape and out.dtype == torch.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_seeded_is_reproducible_and_seed_matters():
    image = _breast()
    first = [build_transforms("mammo", True, seed=3)(image) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], build_transforms("mammo", True, seed=4)(image))
    transform = build_transforms("mammo", True, seed=3)
    assert not torch.equal(transform(image), transform(image))  # a stream, not one fixed draw


def test_mammo_never_flips_left_right():
    transform = build_transforms("mammo", True, seed=0, cfg={"vflip_p": 1.0})
    image = _breast()
    for _ in range(20):
        out = transform(image)[0]
        columns = out.sum(dim=0)
        assert columns[:24].sum() > 3 * columns[24:].sum()


def test_views_are_augmented_independently():
    transform = build_transforms("mammo", True, seed=1)
    pair = torch.stack([_breast(), _breast()])
    out = transform(pair)
    assert not torch.equal(out[0], out[1])


def test_cxr_horizontal_flip_is_optional():
    image = _breast()
    still = dict(rotate_deg=0.0, translate=0.0, scale_min=1.0, scale_max=1.0, brightness=0.0, contrast=0.0)
    flipped = build_transforms("cxr", True, seed=0, cfg={"hflip_p": 1.0, **still})(image)
    assert torch.allclose(flipped, image.flip(-1), atol=1e-5)
    assert torch.allclose(build_transforms("cxr", True, seed=0, cfg=still)(image), image, atol=1e-5)


def test_unknown_keys_and_modality_raise():
    with pytest.raises(ValueError, match=r"unknown mammo augmentation key\(s\) \['hflip_p'\]; valid: \["):
        build_transforms("mammo", True, cfg={"hflip_p": 0.5})
    with pytest.raises(ValueError, match="modality"):
        build_transforms("ct", True)


def test_dataloader_workers_get_different_streams():
    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return transform(_breast())

    transform = build_transforms("mammo", True, seed=0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Same(), batch_size=1, num_workers=2)
    first = torch.cat(list(loader))
    second = torch.cat(list(loader))  # a new epoch: new worker seeds
    assert not torch.equal(first[0], first[1])  # the two workers differ
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(torch.cat(list(loader)), first)  # fixed by the training seed
