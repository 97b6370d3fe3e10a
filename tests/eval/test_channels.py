"""Evaluation over channel subsets (cellrep.eval.channels): a CA-ViT trained on 6 channels embeds a
5-channel TIFF screen with the right channel embeddings; channels=[...] and leave-one-channel-out in
cellrep-probe; fixed-channel models zero-fill; names that are not training channels are refused."""

from __future__ import annotations

import cellrep  # noqa: F401

# isort: split
import json
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from cellrep.data.loading.transforms import normalize
from cellrep.errors import CellrepError
from cellrep.eval.channels import match_channels, model_slots, resolve_channels
from cellrep.eval.features import block_names, extract_block_features
from cellrep.models.backbone import build_backbone

SIX = ("DNA", "ER", "RNA", "AGP", "Mito", "BF")
FIVE = ("Mito", "DNA", "AGP", "ER", "RNA")  # a subset of SIX, in another order
PATTERN = "images/{experiment}/{well}_s{site}_w{channel_index}.tif"
WELLS = [("B02", "DMSO"), ("B03", "DMSO"), ("C02", "cmpd-1"), ("C03", "cmpd-2"), ("C04", "cmpd-3")]
TINY_CA_VIT = (
    "model=ca_vit_s16",
    "+model.kwargs.embed_dim=32",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=2",
    "+model.kwargs.patch_size=8",
)


def pixels(site: str, channel: str) -> np.ndarray:
    """The same stain of the same site has the same pixels in every screen (keyed by name, not index)."""
    rng = np.random.default_rng([zlib.crc32(site.encode()), zlib.crc32(channel.encode())])
    return rng.integers(0, 256, size=(32, 32)).astype(np.uint8)


def write_screen(root, channels):
    rows = [
        dict(experiment=f"b{e}", plate=1, well=w, site=s, cell_type="U2OS", perturbation=p)
        for e in range(3)
        for w, p in WELLS
        for s in (1, 2)
    ]
    root.mkdir(parents=True)
    frame = pd.DataFrame(rows)
    frame["perturbation_type"] = np.where(frame["perturbation"] == "DMSO", "control", "compound")
    frame.to_csv(root / "metadata.csv", index=False)
    for r in rows:
        for i, name in enumerate(channels):
            path = root / PATTERN.format(**r, channel_index=i + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, pixels(f"{r['experiment']}_{r['well']}_{r['site']}", name))
    return root


def data_overrides(root, channels):
    return [
        "data=tiff",
        f"data.root={root}",
        f"data.pattern='{PATTERN}'",
        f"data.channel_names=[{','.join(channels)}]",
        "data.tiff.negative_controls=[DMSO]",
        "data.crop_size=16",
        "data.num_workers=0",
        "data.batch_size=8",
        "split=random",
    ]


@pytest.fixture(scope="module")
def six_channel_run(tmp_path_factory, compose_cfg):
    """A CA-ViT trained for a few channel-sampled steps on a 6-channel TIFF screen."""
    from cellrep.cli.train import train

    root = tmp_path_factory.mktemp("six")
    screen = write_screen(root / "screen6", SIX)
    overrides = [
        *data_overrides(screen, SIX),
        *TINY_CA_VIT,
        "data.channel_sampling=true",
        "logger=csv",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "test=false",
    ]
    train(compose_cfg("train", overrides, root, root / "data"))
    return root / "run", screen, root


def _probe_cfg(compose_cfg, root, ckpt, screen, channels, *extra):
    return compose_cfg(
        "probe",
        [
            "progress=false",
            "loader.num_workers=0",
            f"ckpt_path={ckpt}",
            "use_run_config=false",
            *data_overrides(screen, channels),
            *extra,
        ],
        root,
        root / "data",
    )


def reference_features(backbone, dm, names: list[str], trained: tuple[str, ...]) -> dict[str, np.ndarray]:
    """By hand: the 6-channel screen's normalized crops, the 5 channels picked, channel_ids of their slots."""
    pick = [dm.channel_names.index(n) for n in names]
    ids = torch.tensor([trained.index(n) for n in names])
    out = {}
    for batch in dm.eval_dataloader("all"):
        x = dm.finish_batch(batch)["image"][:, pick]
        blocks = backbone.forward_intermediates(
            x, return_prefix_tokens=True, intermediates_only=True, output_fmt="NLC", channel_ids=ids
        )
        tokens, prefix = blocks[-1]
        pooled = torch.cat([tokens.mean(1), prefix[:, 0]], dim=1)
        for row, f in zip(batch["index"].tolist(), pooled.detach().numpy()):
            out[dm.index["site_id"].iloc[row]] = f
    return out


def test_a_six_channel_ca_vit_embeds_a_five_channel_screen(six_channel_run, compose_cfg, tmp_path):
    from cellrep.eval.pipeline import prepare

    run, screen6, root = six_channel_run
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["channel_names"] == list(SIX)
    screen5 = write_screen(tmp_path / "screen5", FIVE)

    prep5 = prepare(_probe_cfg(compose_cfg, tmp_path, ckpt, screen5, FIVE))
    assert prep5.datamodule.in_chans == 5 and prep5.backbone.input_channel_ids.tolist() == [4, 0, 3, 1, 2]
    last = block_names(prep5.backbone)[-1]
    feats = extract_block_features(prep5.backbone, prep5.datamodule.eval_dataloader("all"), None, "cpu", False)
    got = dict(zip(prep5.datamodule.index["site_id"].iloc[feats.rows], feats.features[last]))

    prep6 = prepare(_probe_cfg(compose_cfg, tmp_path, ckpt, screen6, SIX))
    assert prep6.backbone.input_channel_ids is None  # the training channels: slot c for channel c
    want = reference_features(prep6.backbone, prep6.datamodule, list(FIVE), SIX)
    assert set(got) == set(want) and len(got) == 30
    for site, f in want.items():
        np.testing.assert_allclose(got[site], f, rtol=1e-4, atol=1e-5)

    # control: the same 5-channel images on slots 0..4 (matching by position, not name) embed differently
    prep5.backbone.input_channel_ids = None
    wrong = extract_block_features(prep5.backbone, prep5.datamodule.eval_dataloader("all"), None, "cpu", False)
    assert not np.allclose(wrong.features[last], feats.features[last], atol=1e-4)


def test_probe_on_a_channel_subset_with_leave_one_channel_out(six_channel_run, compose_cfg, tmp_path, capsys):
    from cellrep.cli.probe import probe

    run, screen6, _ = six_channel_run
    cfg = _probe_cfg(
        compose_cfg,
        tmp_path,
        run / "checkpoints" / "last.ckpt",
        screen6,
        SIX,
        "channels=[DNA,ER,2]",  # names and an index (RNA)
        "probe.leave_one_channel_out=true",
        "probe.epochs=2",
        "probe.lrs=[0.01]",
    )
    metrics = probe(cfg)
    assert metrics["channels"] == ["DNA", "ER", "RNA"]
    table = pd.read_csv(tmp_path / "run" / "probe_channels.csv")
    assert list(table["removed"]) == ["none (all channels)", "DNA", "ER", "RNA"]
    assert list(table["channels"]) == [3, 2, 2, 2]
    np.testing.assert_allclose(table["delta"], table["test_acc"] - table["test_acc"].iloc[0])
    loco = json.loads((tmp_path / "run" / "metrics.json").read_text())["leave_one_channel_out"]
    assert set(loco["test_acc"]) == {"DNA", "ER", "RNA"} and loco["block"] == metrics["probe"]["best_block"]
    assert (tmp_path / "run" / "probe_channels.png").stat().st_size > 0
    assert "leave one channel out" in capsys.readouterr().out


def test_unknown_channel_names_are_refused():
    assert model_slots(list(FIVE), list(SIX), 6) == [4, 0, 3, 1, 2]
    with pytest.raises(CellrepError, match=r"\['Actin'\].*not among"):
        model_slots(["DNA", "Actin"], list(SIX), 6)
    with pytest.raises(CellrepError, match="records no channel names"):
        model_slots(list(FIVE), None, 6)
    assert resolve_channels(["ER", "0", "-1"], list(SIX)) == [0, 1, 5]
    for bad in (["Actin"], ["DNA", "0"], ["9"]):
        with pytest.raises(CellrepError):
            resolve_channels(bad, list(SIX))


class _Data:
    """What match_channels reads and sets on a CellDataModule."""

    def __init__(self, names):
        self.channel_names, self.calls = list(names), []

    def set_eval_channels(self, keep=None, zero=None):
        self.calls.append((keep, zero))


def test_a_fixed_channel_model_zero_fills_a_subset_and_refuses_another_count():
    resnet = build_backbone("resnet10t", in_chans=6, num_classes=0)
    dm = _Data(SIX)
    plan = match_channels(resnet, {"in_chans": 6}, dm, "unused.ckpt", ["DNA", "Mito"])
    assert plan.kept_names == ["DNA", "Mito"] and dm.calls[-1] == (None, [1, 2, 3, 5])
    with pytest.raises(CellrepError, match="takes 6 channels but the data has 5") as err:
        match_channels(resnet, {"in_chans": 6}, _Data(FIVE), "unused.ckpt")
    assert "ca_vit" in err.value.fix


def test_zero_filled_channels_are_zero_after_normalization(tiny_shards_for_eval):
    dm = tiny_shards_for_eval
    batch = next(iter(dm.eval_dataloader("val")))
    full = dm.finish_batch(dict(batch))["image"]
    dm.set_eval_channels(zero=[1])
    out = dm.finish_batch(dict(batch))["image"]
    assert out.shape == full.shape and torch.all(out[:, 1] == 0) and full[:, 1].abs().sum() > 0
    torch.testing.assert_close(out[:, [0, 2]], full[:, [0, 2]])  # the others normalized as before


@pytest.fixture
def tiny_shards_for_eval(tmp_path):
    from cellrep.data.loading.datamodule import CellDataModule
    from cellrep.data.shards.writer import write_shards

    class Source:  # 3 channels, 2 experiments, every well a negative control (plate statistics exist)
        name, fingerprint, channel_names = "t", "t-v1", ("a", "b", "c")

        def __init__(self):
            from cellrep.data.schema import make_site_id, validate_metadata

            rows = [
                dict(
                    site_id=make_site_id(f"e{e}", 1, f"B0{w}", 1),
                    experiment=f"e{e}",
                    plate=1,
                    well=f"B0{w}",
                    site=1,
                    cell_type="U2OS",
                    perturbation="EMPTY_control" if w < 3 else f"g{w}",
                    perturbation_type="control" if w < 3 else "siRNA",
                    concentration=float("nan"),
                    well_type="negative_control" if w < 3 else "treatment",
                )
                for e in range(4)
                for w in range(1, 7)
            ]
            self.metadata = validate_metadata(pd.DataFrame(rows), "t")

        def load(self, site_id):
            rng = np.random.default_rng(zlib.crc32(site_id.encode()))
            return rng.integers(1, 256, (3, 16, 16), dtype=np.uint8)

    write_shards(Source(), tmp_path / "shards", samples_per_shard=8, progress=False)
    split = {"name": "random", "test_fraction": 0.25, "val_fraction": 0.25, "holdout": None, "shots": 0, "seed": 0}
    return CellDataModule(tmp_path / "shards", split, batch_size=8, num_workers=0, crop_size=16)


def test_normalize_is_unchanged_by_the_channel_settings():
    x = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    from cellrep.data.loading.transforms import BatchFinisher

    mean, std = torch.rand(1, 3) * 100, torch.rand(1, 3) * 10 + 1
    batch = {"image": x, "plate": torch.zeros(2, dtype=torch.long), "index": torch.arange(2)}
    full = BatchFinisher("plate_controls", mean, std)(batch)["image"]
    kept = BatchFinisher("plate_controls", mean, std, keep=[2, 0])(batch)["image"]
    torch.testing.assert_close(kept, full[:, [2, 0]])
    torch.testing.assert_close(full, normalize(x, "plate_controls", (mean[0], std[0])))


def test_mae_trains_on_channel_sampled_batches_with_their_channel_embeddings(tmp_path, compose_cfg):
    """task=mae with data.channel_sampling: encoder and decoder both see the subset's channel slots."""
    from cellrep.cli.train import train
    from cellrep.models.mae import MaskedAutoencoder

    screen = write_screen(tmp_path / "screen", SIX)
    overrides = [
        *data_overrides(screen, SIX),
        *TINY_CA_VIT,
        "task=mae",
        "task.decoder_dim=32",
        "task.decoder_depth=1",
        "task.decoder_heads=2",
        "data.channel_sampling=true",
        "logger=csv",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "test=false",
    ]
    train(compose_cfg("train", overrides, tmp_path, tmp_path / "data"))
    assert (
        "channel_names"
        in torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    )

    encoder = build_backbone(
        "ca_vit_small_patch16", in_chans=6, num_classes=0, embed_dim=32, depth=1, num_heads=2, patch_size=8
    )
    mae = MaskedAutoencoder(encoder, 6, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    ids = torch.tensor([1, 3, 5])
    pos = mae.decoder.positions((2, 2), 3, "cpu", torch.float32, ids)
    want = mae.decoder.positions((2, 2), 6, "cpu", torch.float32).reshape(6, 4, -1)[ids].reshape(12, -1)
    torch.testing.assert_close(pos, want)  # the decoder's channel embeddings of slots 1, 3, 5
    x = torch.randn(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = mae(x, 0.5, gen, ids)
    assert out.pred.shape == (2, 12, 64) and torch.isfinite(out.pred).all()
