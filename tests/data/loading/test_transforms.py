"""Normalization modes and dihedral crop augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrep.data.loading.transforms import (
    BatchFinisher,
    center_crop,
    flip_rot90_batch,
    flip_rot90_view,
    normalize,
    random_crop_flip_rot90,
    random_crop_view,
)
from cellrep.errors import CellrepError


@pytest.fixture
def image():
    return torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_stats_normalization_by_hand(image):
    stats = {"mean": [10.0, 100.0, 200.0], "std": [2.0, 4.0, 8.0]}
    for mode in ("plate_controls", "global"):
        out = normalize(image, mode, stats)
        assert out.dtype == torch.float32 and out.shape == image.shape
        for c in range(3):
            expected = (image[c].double() - stats["mean"][c]) / stats["std"][c]
            torch.testing.assert_close(out[c].double(), expected, rtol=1e-6, atol=1e-5)
    as_pair = normalize(image, "plate_controls", (stats["mean"], stats["std"]))
    torch.testing.assert_close(as_pair, normalize(image, "plate_controls", stats))


def test_batch_with_per_image_stats(image):
    batch = torch.stack([image, image])
    mean = torch.tensor([[0.0, 0, 0], [1, 2, 3]])
    std = torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    out = normalize(batch, "plate_controls", (mean, std))
    torch.testing.assert_close(out[1], normalize(image, "plate_controls", (mean[1], std[1])))
    torch.testing.assert_close(out[0], image.float())


def test_self_normalization(image):
    out = normalize(image, "self")
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(1, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    flat = normalize(torch.full((2, 4, 4), 7, dtype=torch.uint8), "self")
    assert torch.isfinite(flat).all() and (flat == 0).all()


def test_normalization_errors(image):
    with pytest.raises(CellrepError, match="unknown normalization"):
        normalize(image, "zscore", {"mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(CellrepError, match="needs mean/std"):
        normalize(image, "global")
    with pytest.raises(CellrepError, match="3 channels"):
        normalize(image, "global", {"mean": [0, 0], "std": [1, 1]})


def _dihedral(x):
    for flipped in (x, x.flip(-1)):
        for k in range(4):
            yield torch.rot90(flipped, k, dims=(-2, -1))


def test_random_crop_is_a_dihedral_view_of_some_crop(image):
    gen = torch.Generator().manual_seed(1)
    crops = [image[:, t : t + 6, left : left + 6] for t in range(5) for left in range(7)]
    transforms = set()
    for _ in range(40):
        out = random_crop_flip_rot90(image, 6, gen)
        assert out.shape == (3, 6, 6)
        found = [i for c in crops for i, d in enumerate(_dihedral(c)) if torch.equal(out, d)]
        assert found, "output is not a flipped/rotated crop"
        transforms.add(found[0])
    assert len(transforms) >= 6, "all flips and rotations occur"
    a = random_crop_flip_rot90(image, 6, torch.Generator().manual_seed(5))
    b = random_crop_flip_rot90(image, 6, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = {random_crop_flip_rot90(image, 6, gen).numpy().tobytes() for _ in range(20)}
    assert len(draws) > 10


def test_center_crop_and_size_errors(image):
    out = center_crop(image, 4)
    assert torch.equal(out, image[:, 3:7, 4:8])
    assert torch.equal(center_crop(image, 10), image[:, :, 1:11])
    for fn in (center_crop, random_crop_flip_rot90):
        with pytest.raises(CellrepError, match="crop size 11 does not fit images of 10×12"):
            fn(image, 11)


def test_normalize_in_place_matches_reference_and_leaves_input_alone():
    # normalize works in place on its own float copy (a loader speed-up, docs/PERFORMANCE.md)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=gen)
    mean, std = torch.rand(2, 3, generator=gen) * 50, torch.rand(2, 3, generator=gen) * 9 + 1
    ref = (image.float() - mean[..., None, None]) / std[..., None, None]
    torch.testing.assert_close(normalize(image, "plate_controls", (mean, std)), ref, rtol=0, atol=0)
    as_float = image.float()
    before = as_float.clone()
    normalize(as_float, "self")
    normalize(as_float, "global", (mean[0], std[0]))
    assert torch.equal(as_float, before)


def test_crop_view_then_batched_flip_rot_equals_the_per_sample_augmentation():
    # the loader crops by numpy views (one copy, into the batch) and flips/rotates whole batches on the
    # device, or (CPU-only training) flips/rotates each view in the worker: same draws, same pixels as
    # random_crop_flip_rot90 per sample
    x = torch.randint(0, 256, (3, 20, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    arr = x.numpy()
    refs, crops, draws = [], [], []
    for seed in range(120):  # every one of the 16 flip/rotation combinations occurs
        refs.append(random_crop_flip_rot90(x, 9, torch.Generator().manual_seed(seed)))
        view, flip_rot = random_crop_view(arr, 9, torch.Generator().manual_seed(seed))
        assert np.shares_memory(view, arr) and view.strides[-1] == 1  # a plain crop: rows copy as rows
        crops.append(torch.from_numpy(view.copy()))
        draws.append(flip_rot)
        in_worker = flip_rot90_view(view, flip_rot)  # the CPU-only path: strided view, copied once
        assert np.shares_memory(in_worker, arr) and np.array_equal(np.ascontiguousarray(in_worker), refs[-1].numpy())
    assert len(set(draws)) == 16
    out = flip_rot90_batch(torch.stack(crops), torch.tensor(draws, dtype=torch.uint8))
    assert torch.equal(out, torch.stack(refs))
    with pytest.raises(CellrepError, match="crop size 18 does not fit images of 20×17"):
        random_crop_view(arr, 18)


@pytest.mark.parametrize("mode", ["plate_controls", "global", "self"])
def test_batch_normalizer_equals_per_sample_normalize(mode):
    # the batched path (loader → finish_batch on the device) vs the per-sample one it replaced
    gen = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=gen)
    mean, std = torch.rand(4, 3, generator=gen) * 60, torch.rand(4, 3, generator=gen) * 9 + 0.5
    plate = torch.tensor([3, 0, 0, 2, 1])
    batch = {"image": image, "plate": plate, "index": torch.arange(5)}
    out = BatchFinisher(mode, mean, std)(batch)
    assert out["image"].dtype == torch.float32 and out["index"] is batch["index"] and batch["image"] is image
    for i in range(5):
        stats = None if mode == "self" else (mean[plate[i]], std[plate[i]])
        one = normalize(image[i], mode, stats)
        torch.testing.assert_close(out["image"][i], one, rtol=0, atol=1e-6 if mode == "self" else 0)
    assert BatchFinisher(mode, mean, std)(out) is out  # already finished: unchanged


def test_batch_normalizer_rejects_what_it_cannot_finish():
    stats = torch.zeros(1, 3), torch.ones(1, 3)
    with pytest.raises(CellrepError, match="unknown normalization"):
        BatchFinisher("zscore", *stats)
    with pytest.raises(CellrepError, match="expected uint8 B×C×H×W"):
        BatchFinisher("global", *stats)({"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "plate": None})
