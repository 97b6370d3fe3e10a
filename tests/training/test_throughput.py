"""The throughput callback: parameter counts at the start, images/s over all ranks while training."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
from types import SimpleNamespace

import pytest
import torch

from cellrep.training.callbacks import throughput
from cellrep.training.callbacks.throughput import Throughput, parameter_counts


class Module(torch.nn.Module):
    """Stands in for a LightningModule: a frozen and a trainable layer, and a log_dict that records."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.frozen, self.head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
        self.frozen.requires_grad_(False)
        self.logged: list[dict] = []

    def log_dict(self, stats, **kwargs):
        self.logged.append(dict(stats))


class Logger:
    def __init__(self):
        self.metrics: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))


class Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_parameter_counts_split_total_and_trainable():
    assert parameter_counts(Module()) == {"params/total": 4 * 3 + 3 + 3 * 2 + 2, "params/trainable": 3 * 2 + 2}


def test_images_per_second_count_every_rank_and_reset_each_window(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(throughput, "time", clock)
    module, logger = Module(), Logger()
    trainer = SimpleNamespace(world_size=2, loggers=[logger])
    cb = Throughput(log_every_n_steps=2)

    cb.on_fit_start(trainer, module)
    assert logger.metrics == [({k: float(v) for k, v in parameter_counts(module).items()}, 0)]
    assert cb.summary["params/trainable"] < cb.summary["params/total"]

    def step(batch_idx, batch, seconds):
        cb.on_train_batch_start(trainer, module, batch, batch_idx)
        clock.now += seconds
        cb.on_train_batch_end(trainer, module, None, batch, batch_idx)

    images = {"image": torch.zeros(4, 6, 8, 8)}
    step(0, images, 1.0)
    assert module.logged == []  # logged every 2nd step only
    step(1, images, 3.0)
    # 2 steps × 4 images × 2 ranks in 4 s
    assert module.logged == [{"perf/images_per_s": pytest.approx(16 / 4.0)}]
    step(2, (torch.zeros(10, 6, 8, 8), torch.zeros(10)), 0.5)  # (images, labels) batches count too
    step(3, images, 0.5)
    assert module.logged[-1] == {"perf/images_per_s": pytest.approx((10 + 4) * 2 / 1.0)}  # this window only
    assert cb.summary["perf/images_per_s"] == module.logged[-1]["perf/images_per_s"]
    assert "perf/gpu_mem_gb" not in cb.summary  # CUDA only

    with caplog.at_level(logging.INFO):
        cb.on_train_end(trainer, module)
    assert "throughput: perf/images_per_s 28" in caplog.text


def test_a_run_shorter_than_one_window_still_reports(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput, "time", clock)
    module, trainer = Module(), SimpleNamespace(world_size=1, loggers=[])
    cb = Throughput(log_every_n_steps=50)
    cb.on_fit_start(trainer, module)
    batch = {"image": torch.zeros(3, 1, 4, 4)}
    cb.on_train_batch_start(trainer, module, batch, 0)
    clock.now += 2.0
    cb.on_train_batch_end(trainer, module, None, batch, 0)
    cb.on_train_end(trainer, module)
    assert module.logged == [] and cb.summary["perf/images_per_s"] == pytest.approx(3 / 2.0)
