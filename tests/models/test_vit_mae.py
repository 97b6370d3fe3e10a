"""The MAE model: token/pixel layout, masking, encoder on visible tokens only, any channel count."""

import pytest
import torch

from cellrep.models.backbone import build_backbone
from cellrep.models.mae import MaskedAutoencoder, random_masking
from cellrep.training.tasks.mae_loss import mae_loss, normalize_patches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ENCODERS = ["vit_small_patch16_224", "ca_vit_small_patch16", "vit_large_patch8_256"]


def make_mae(name: str, in_chans: int, encoder_kwargs: dict | None = None, **kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    encoder = build_backbone(
        name,
        in_chans=in_chans,
        num_classes=0,
        img_size=32,
        embed_dim=64,
        depth=2,
        num_heads=4,
        **(encoder_kwargs or {}),
    )
    return MaskedAutoencoder(encoder, in_chans, decoder_dim=32, decoder_depth=2, decoder_heads=4, **kwargs)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("in_chans", [3, 5, 11])
def test_patchify_round_trip_and_one_prediction_per_token(name, in_chans):
    mae = make_mae(name, in_chans)
    x = torch.randn(2, in_chans, 32, 32)
    patches = mae.patchify(x)
    torch.testing.assert_close(mae.unpatchify(patches, x.shape), x, rtol=0, atol=0)
    out = mae(x, mask_ratio=0.75)
    assert out.pred.shape == patches.shape
    assert torch.isfinite(out.pred).all()
    assert out.mask.shape == patches.shape[:2]
    assert (out.mask.sum(dim=1) == round(0.75 * patches.shape[1])).all()


def test_token_layouts():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # 2 channels, 2×2 patches of 2 px
    vit = make_mae("vit_small_patch16_224", 2)
    ca = make_mae("ca_vit_small_patch16", 2)
    vit.patch_size = ca.patch_size = 2
    # ViT: a token holds one patch of every channel (pixel-major, channel last)
    assert vit.patchify(x)[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]
    # CA-ViT: a token holds one patch of one channel, tokens channel-major
    assert ca.patchify(x)[0, :, 0].tolist() == [0, 2, 8, 10, 16, 18, 24, 26]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "ca_vit_small_patch16"])
def test_the_encoder_sees_only_the_visible_tokens(name):
    mae = make_mae(name, 6)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    mae(torch.randn(3, 6, 32, 32), mask_ratio=0.75)
    tokens = 4 * (6 if "ca_vit" in name else 1)
    assert seen == [(3, 1 + tokens // 4, 64)]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "ca_vit_small_patch16"])
def test_the_encoder_runs_the_backbones_own_tokens_that_stay_visible(name):
    """Masking only picks tokens out of the backbone's own sequence; the blocks and norm are the backbone's."""
    mae = make_mae(name, 5).eval()
    enc, n = mae.encoder, mae.num_prefix_tokens
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        latent, _, mask = mae.encode(x, 0.75, torch.Generator().manual_seed(0))
        # the backbone's own stem, written out: a CA-ViT's embed; timm's pieces in forward_features' order
        tokens = enc.embed(x) if "ca_vit" in name else enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(x))))
        L, D = tokens.shape[1] - n, tokens.shape[2]
        ids_keep, _ = random_masking(L, L // 4, 2, x.device, torch.Generator().manual_seed(0))
        visible = tokens[:, n:].gather(1, ids_keep[..., None].expand(-1, -1, D))
        expected = enc.norm(enc.blocks(torch.cat([tokens[:, :n], visible], dim=1)))
    assert torch.equal(latent, expected)
    assert not mask.gather(1, ids_keep).any()


def test_timms_patch_dropout_is_left_to_the_masking():
    """MAE's masking is its patch dropout: an encoder's patch_drop_rate changes nothing."""
    x = torch.randn(2, 5, 32, 32)
    outs = []
    for rate in (0.0, 0.5):
        mae = make_mae("vit_small_patch16_224", 5, {"patch_drop_rate": rate}).train()
        outs.append(mae(x, 0.5, torch.Generator().manual_seed(1)))
    assert torch.equal(outs[0].latent, outs[1].latent) and torch.equal(outs[0].pred, outs[1].pred)


def test_masks_differ_per_sample_and_are_reproducible_with_a_generator():
    mae = make_mae("ca_vit_small_patch16", 6)
    x = torch.randn(4, 6, 32, 32)
    a = mae(x, 0.75, torch.Generator().manual_seed(1)).mask
    b = mae(x, 0.75, torch.Generator().manual_seed(1)).mask
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) > 1


@pytest.mark.parametrize("name", ENCODERS)
def test_gradient_on_every_trainable_parameter(name):
    mae = make_mae(name, 5)
    x = torch.randn(2, 5, 32, 32)
    out = mae(x, 0.5)
    mae_loss(out.pred, mae.patchify(x), out.mask, mae.patch_size)["loss"].backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    frozen = [n for n, p in mae.named_parameters() if not p.requires_grad]
    assert frozen == ([] if "ca_vit" in name else ["encoder.pos_embed"])  # fixed sin-cos positions


def test_grad_checkpointing_changes_memory_not_results():
    x = torch.randn(2, 6, 32, 32)
    results = []
    for flag in (False, True):
        mae = make_mae("vit_small_patch16_224", 6, grad_checkpointing=flag)
        out = mae(x, 0.75, torch.Generator().manual_seed(0))
        loss = mae_loss(out.pred, mae.patchify(x), out.mask, mae.patch_size)["loss"]
        loss.backward()
        results.append((loss.detach(), mae.encoder.blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_loss_counts_only_masked_tokens_and_targets_are_patch_normalized():
    patches = torch.randn(2, 4, 8 * 8 * 3) * 5 + 3
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    target = normalize_patches(patches)
    perfect = target.clone()
    perfect[0, 1:] = 100.0  # visible tokens: anything goes
    perfect[1, :3] = -100.0
    out = mae_loss(perfect, patches, mask, patch_size=8)
    assert out["mse"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["fourier"].item() == pytest.approx(0.0, abs=1e-5)
    zeros = mae_loss(torch.zeros_like(patches), patches, mask, patch_size=8, fourier_weight=0.0)
    assert zeros["mse"].item() == pytest.approx(1.0, abs=1e-4)  # standardized targets: predicting 0 costs 1
    assert "fourier" not in zeros


def test_fourier_term_penalizes_blur_that_mse_barely_sees():
    torch.manual_seed(0)
    target = torch.randn(1, 16, 8 * 8)
    blurred = normalize_patches(target).reshape(1, 16, 8, 8)
    blurred = torch.nn.functional.avg_pool2d(blurred, 3, 1, 1, count_include_pad=False).reshape(1, 16, 64)
    mask = torch.ones(1, 16)
    sharp = mae_loss(normalize_patches(target), target, mask, patch_size=8, fourier_weight=1.0)
    blur = mae_loss(blurred, target, mask, patch_size=8, fourier_weight=1.0)
    assert blur["fourier"] > 0.3 and sharp["fourier"] < 1e-5


def test_a_crop_that_does_not_tile_into_patches_is_a_clear_error():
    from cellrep.errors import CellrepError

    mae = make_mae("ca_vit_small_patch16", 3)
    with pytest.raises(CellrepError, match="not divisible by the patch size 16"):
        mae.patchify(torch.randn(1, 3, 40, 40))
