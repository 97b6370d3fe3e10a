"""GPU training throughput: images/s and model-FLOPs utilization (MFU), bf16, eager vs torch.compile.

Cases (docs/PERFORMANCE.md): MAE ViT-L/8 at 256 px (6 channels, mask 0.75, 8×512 decoder,
the ``experiment=mae_vit_l8`` model), DINO ViT-L/16 with DINOv2's head and crops (2 global crops at
the input size, 8 local ones at half of it, 65536 prototypes, iBOT on, teacher EMA in each step) and
the supervised ResNet50 at 256 px (channels_last). One training step = forward + loss + backward + AdamW step
under bf16 autocast with fp32 weights (what ``precision=bf16-mixed`` runs);
inputs live on the GPU, so the figure is the model's ceiling, not the loader's.

MFU = (model FLOPs per step, counted once by ``torch.utils.flop_counter`` on
forward + backward) × steps/s ÷ the GPU's dense bf16 peak. Recomputation
(activation checkpointing) is not counted as useful work, by definition.

    python benchmarks/gpu_throughput.py                      # both models, eager and compiled
    python benchmarks/gpu_throughput.py --cases mae_vit_l8 --batch-mae 256 --json out.json
    python benchmarks/gpu_throughput.py --cases dino_vit_l16 --batch-dino 64
    python benchmarks/gpu_throughput.py --device cpu --tiny   # smoke test of this script, no GPU

Without CUDA (and without ``--device cpu``) it prints why and exits 0.
"""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cellrep.models.backbone import build_backbone
from cellrep.training.tasks.dino import DINOTask
from cellrep.training.tasks.dino_loss import ema_update
from cellrep.training.tasks.mae import MAETask

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched on the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 125.0,
    "A10": 125.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "V100": 125.0,
}


@dataclass
class Result:
    case: str
    compiled: bool
    batch: int
    images_per_s: float
    step_ms: float
    tflops_per_s: float
    mfu: Optional[float]
    gflops_per_image: float
    peak_mem_gib: float


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def mae_case(channels: int, size: int, tiny: bool, compile: bool):
    dims = dict(embed_dim=64, depth=2, num_heads=4) if tiny else {}
    dec = dict(decoder_dim=64, decoder_depth=2, decoder_heads=4) if tiny else {}
    task = MAETask(
        {"name": "vit_large_patch8_256", "img_size": size, "kwargs": dims},
        channels,
        optimizer={},
        scheduler={},
        mask_ratio=0.75,
        compile=compile,
        reconstructions_every_n_steps=0,
        **dec,
    )
    return task, lambda images: task(images)["loss"]


def dino_case(channels: int, size: int, tiny: bool, compile: bool):
    dims = dict(embed_dim=64, depth=2, num_heads=4) if tiny else {}
    # DINOv2's head (65536 prototypes, 2048 hidden, 256 bottleneck), or a tiny one
    sizes = (256, 64, 32) if tiny else (65536, 2048, 256)
    head = dict(zip(("out_dim", "head_hidden_dim", "head_bottleneck_dim"), sizes))
    task = DINOTask(
        {"name": "vit_large_patch16_224", "img_size": size, "kwargs": dims},
        channels,
        optimizer={},
        scheduler={},
        local_crops=8,
        ibot_weight=1.0,
        compile=compile,
        **head,
    )

    def loss(images: torch.Tensor) -> torch.Tensor:
        ema_update(task.teacher, task.student, 0.996)  # the teacher's step, charged to the step's time
        return task(images)[0]["loss"]

    return task, loss


def resnet_case(channels: int, size: int, tiny: bool, compile: bool, num_classes: int = 1139):
    model = build_backbone("resnet18" if tiny else "resnet50", in_chans=channels, num_classes=num_classes)
    model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile else model
    labels: dict[int, torch.Tensor] = {}

    def loss(images: torch.Tensor) -> torch.Tensor:
        target = labels.setdefault(
            images.shape[0], torch.randint(num_classes, (images.shape[0],), device=images.device)
        )
        return F.cross_entropy(run(images.contiguous(memory_format=torch.channels_last)).float(), target)

    return model, loss


CASES: dict[str, Callable] = {"mae_vit_l8": mae_case, "dino_vit_l16": dino_case, "resnet50": resnet_case}


def measure(case: str, compile: bool, batch: int, flops: float, args, device: torch.device) -> Result:
    torch.manual_seed(0)
    module, loss_fn = CASES[case](args.channels, args.size, args.tiny, compile)
    module.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    images = torch.randn(batch, args.channels, args.size, args.size, device=device)
    autocast = bf16(device, args)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(images)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):  # includes compilation when compile=True
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    peak = peak_tflops(device, args.peak_tflops)
    achieved = flops / seconds / 1e12
    return Result(
        case=case,
        compiled=compile,
        batch=batch,
        images_per_s=batch / seconds,
        step_ms=seconds * 1e3,
        tflops_per_s=achieved,
        mfu=achieved / peak if peak else None,
        gflops_per_image=flops / batch / 1e9,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
    )


def bf16(device: torch.device, args):
    if args.fp32 or device.type == "meta":  # FLOP counts on the meta device need no autocast
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def count_flops(make_case: Callable, args, device: torch.device, batch: int) -> float:
    """Forward + backward FLOPs of one step, counted on an eager model (compiled graphs hide their ops)."""
    with device:  # on the meta device: full-size models count FLOPs without memory
        module, loss_fn = make_case(args.channels, args.size, args.tiny, False)
    module.to(device)
    images = torch.randn(batch, args.channels, args.size, args.size, device=device)
    with FlopCounterMode(display=False) as counter:
        with bf16(device, args):
            loss = loss_fn(images)
        loss.backward()
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float(counter.get_total_flops())


HEADER = (
    f"{'case':<12} {'compile':<7} {'batch':>5} {'images/s':>10} {'step ms':>9} {'TFLOP/s':>8} "
    f"{'MFU':>6} {'GFLOP/img':>10} {'mem GiB':>8}"
)


def row(r: Result) -> str:
    mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "   n/a"
    return (
        f"{r.case:<12} {'yes' if r.compiled else 'no':<7} {r.batch:>5} {r.images_per_s:>10.1f} "
        f"{r.step_ms:>9.1f} {r.tflops_per_s:>8.1f} {mfu:>6} {r.gflops_per_image:>10.1f} {r.peak_mem_gib:>8.1f}"
    )


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="mae_vit_l8,resnet50", help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--batch-mae", type=int, default=128)
    p.add_argument("--batch-dino", type=int, default=64, help="images; each gives 2 global + 8 local crops")
    p.add_argument("--batch-resnet", type=int, default=256)
    p.add_argument("--size", type=int, default=256, help="crop size in pixels")
    p.add_argument("--channels", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", choices=["both", "yes", "no"], default="both")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, if the GPU is not in the table")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny widths, for a smoke test of the script")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_throughput: skipped: no CUDA device is available (this benchmark measures GPU training "
            "throughput; run it on a GPU machine, or pass --device cpu --tiny to smoke-test the script)"
        )
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    compile_modes = {"both": [False, True], "yes": [True], "no": [False]}[args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}; {args.channels} channels × {args.size} px, "
        f"{'fp32' if args.fp32 else 'bf16 autocast'}; {args.warmup} warmup + {args.steps} timed steps\n{HEADER}"
    )
    results = []
    for case in args.cases.split(","):
        batch = {"mae": args.batch_mae, "dino": args.batch_dino}.get(case.split("_")[0], args.batch_resnet)
        flops = count_flops(CASES[case], args, device, batch)
        for compile in compile_modes:
            results.append(measure(case, compile, batch, flops, args, device))
            print(row(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "torch": torch.__version__, "results": [asdict(r) for r in results]}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
