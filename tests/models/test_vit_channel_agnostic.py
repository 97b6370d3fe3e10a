"""CA-ViT: one set of weights for 3, 5, 6 and 11 channels; channels are told apart, positions are shared."""

import pytest
import torch

from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.ca_vit import ChannelAgnosticViT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone("ca_vit_small_patch16", in_chans=6, num_classes=5, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize("channels", [3, 5, 6, 11])
def test_same_weights_take_any_channel_count(model, channels):
    model.zero_grad()
    out = model(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.patch_embed.weight.grad.abs().sum() > 0
    used = model.channel_embed.grad.abs().sum(dim=1) > 0  # exactly the first C channel slots are trained
    assert used.tolist() == [c < channels for c in range(model.max_channels)]


def test_tokens_are_channel_major_and_share_positions_across_channels(model):
    x = torch.randn(1, 3, 32, 32)
    tokens = model.embed(x)
    assert tokens.shape == (1, 1 + 3 * 4, 64)
    # the same pixels in channel 0 and channel 2 differ only by the two channel embeddings
    same = torch.cat([x[:, :1], x[:, :1], x[:, :1]], dim=1)
    t = model.embed(same)[0, 1:].reshape(3, 4, 64)
    torch.testing.assert_close(t[2] - t[0], (model.channel_embed[2] - model.channel_embed[0]).expand(4, -1))


def test_swapping_channels_changes_the_features(model):
    """A learned channel embedding makes the model see which stain is which (no set-of-channels blindness)."""
    model.eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(x[:, [1, 0, 2, 3, 4, 5]])
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)


def test_channel_ids_map_inputs_onto_embedding_slots(model):
    """JUMP's 5 channels can reuse the slots of the matching RxRx1 stains."""
    model.eval()
    x = torch.randn(1, 6, 32, 32)
    slots = torch.tensor([0, 2, 3, 4, 5])
    with torch.no_grad():
        via_ids = model(x[:, [0, 2, 3, 4, 5]], channel_ids=slots)
    assert via_ids.shape == (1, 5)


def test_any_crop_size_divisible_by_the_patch(model):
    assert model(torch.randn(1, 6, 64, 48)).shape == (1, 5)
    with pytest.raises(CellrepError, match="not divisible by the patch size 16"):
        model(torch.randn(1, 6, 40, 40))


def test_more_channels_than_slots_is_a_clear_error():
    small = ChannelAgnosticViT(embed_dim=32, depth=1, num_heads=2, max_channels=4, num_classes=0)
    with pytest.raises(CellrepError, match="(?s)5 channels.*4 channel slots.*max_channels"):
        small(torch.randn(1, 5, 32, 32))


def test_intermediates_are_tokens_only_in_nlc(model):
    with pytest.raises(CellrepError, match="NLC"):
        model.forward_intermediates(torch.randn(1, 6, 32, 32), output_fmt="NCHW")


def test_grad_checkpointing_gives_the_same_gradients(model):
    x = torch.randn(2, 5, 32, 32)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        model(x).sum().backward()
        grads.append(model.patch_embed.weight.grad.clone())
    model.set_grad_checkpointing(False)
    torch.testing.assert_close(grads[0], grads[1])


def test_features_and_intermediates_come_from_the_same_pass(model):
    """forward_features and forward_intermediates run the same tokens through the same block runner."""
    model.eval()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        final, blocks = model.forward_intermediates(x, norm=True, return_prefix_tokens=True)
        features = model.forward_features(x)
    assert torch.equal(final, features)
    tokens, cls = blocks[-1]
    assert torch.equal(torch.cat([cls, tokens], dim=1), features)
