"""Per-block features from ONE backbone pass (docs/benchmarks.md, §7 "Probing") and the probes trained on them."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import numpy as np
import pytest
import torch

from cellrep.errors import CellrepError
from cellrep.eval.features import block_names, extract_block_features, resolve_block
from cellrep.eval.probe import ProbeSettings, train_probes
from cellrep.models.backbone import build_backbone


def loader(n=10, batch=4, chans=3, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, chans, size, size, generator=g)
    return [
        {"image": images[i : i + batch], "index": torch.arange(i, min(i + batch, n)).flip(0)}
        for i in range(0, n, batch)
    ]


def count_passes(backbone, stem: str) -> list[int]:
    calls = [0]
    backbone.get_submodule(stem).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "name,stem,dims",
    [
        ("resnet18", "conv1", [64, 64, 128, 256, 512]),
        ("vit_small_patch16_224", "patch_embed", [768] * 12),  # mean of patch tokens ++ class token
    ],
)
def test_all_blocks_cost_one_forward_pass_per_batch(name, stem, dims):
    backbone = build_backbone(name, in_chans=3, img_size=32)
    calls = count_passes(backbone, stem)
    batches = loader()
    feats = extract_block_features(backbone, batches, progress=False)
    assert calls[0] == len(batches)  # not len(batches) × number of blocks
    assert list(feats.features) == block_names(backbone)
    assert [f.shape for f in feats.features.values()] == [(10, d) for d in dims]
    assert list(feats.rows) == list(range(10))  # sorted back into index order
    assert all(np.isfinite(f).all() for f in feats.features.values())


def test_one_block_only_and_rows_match_full_pass():
    backbone = build_backbone("resnet18", in_chans=3)
    full = extract_block_features(backbone, loader(), progress=False)
    one = extract_block_features(backbone, loader(), blocks=[2], progress=False)
    assert list(one.features) == ["layer2"]
    np.testing.assert_allclose(one.features["layer2"], full.features["layer2"], rtol=1e-5, atol=1e-6)


def test_block_names_and_indices():
    backbone = build_backbone("resnet18", in_chans=3)
    assert resolve_block(backbone, -1) == 4 and resolve_block(backbone, "layer3") == 3
    with pytest.raises(CellrepError, match="out of range"):
        resolve_block(backbone, 7)


def test_probes_find_the_informative_block():
    rng = np.random.default_rng(0)
    n, classes = 300, 5
    labels = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, 8)) * 3
    features = {
        "noise": rng.standard_normal((n, 8)),
        "signal": centers[labels] + rng.standard_normal((n, 8)),
        "scaled": 1000 * (centers[labels] + rng.standard_normal((n, 8))),
    }  # BatchNorm makes scale moot
    stage = np.array(["train"] * 200 + ["val"] * 40 + ["test"] * 60)
    result = train_probes(features, labels, stage, classes, ProbeSettings(epochs=40, batch_size=64), progress=False)
    acc = dict(zip(result.table["block"], result.table["test_acc"]))
    assert acc["signal"] > 0.8 and acc["scaled"] > 0.8 and acc["noise"] < 0.45
    assert result.best_block in ("signal", "scaled") and result.selected_on == "val"
    assert set(result.table["best_lr"]) <= set(ProbeSettings().lrs)


def test_probe_needs_held_out_rows():
    with pytest.raises(CellrepError, match="held-out rows"):
        train_probes({"b": np.zeros((4, 2))}, np.array([0, 1, 0, 1]), np.array(["train"] * 4), 2, progress=False)
