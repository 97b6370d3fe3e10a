import pytest
import torch

from cellrep.training.tasks.base import NonFiniteLossError
from cellrep.training.tasks.supervised import SupervisedTask


def make_task(num_classes=4):
    return SupervisedTask(
        model={"name": "resnet18"},
        in_chans=3,
        num_classes=num_classes,
        optimizer={"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
        scheduler={"warmup_fraction": 0.1, "min_lr_ratio": 0.01},
        group_names=["HUVEC", "RPE"],
        group_of_index=torch.tensor([0, 1, 0, 1]),
    )


def test_forward_gives_one_logit_per_class():
    task = make_task(num_classes=4).eval()
    assert task(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_non_finite_loss_stops_with_a_clear_message():
    task = make_task()
    batch = {
        "image": torch.full((2, 3, 32, 32), float("nan")),
        "label": torch.tensor([0, 1]),
        "index": torch.tensor([0, 1]),
    }
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept"):
        task.training_step(batch, 0)
