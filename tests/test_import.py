"""cellrep imports on the CPU torch + CUDA-only torchvision stack, and makes timm importable."""

import subprocess
import sys


def test_import_cellrep_then_timm_in_a_fresh_interpreter():
    code = (
        "import cellrep, timm, torch; m = timm.create_model('resnet18', in_chans=5, num_classes=3).eval(); "
        "print(m(torch.zeros(1, 5, 32, 32)).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 3])" in out.stdout


def test_import_turns_on_huge_pages_for_large_cpu_tensors_unless_the_user_chose():
    import os

    code = "import os, cellrep; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    chosen = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"THP_MEM_ALLOC_ENABLE": "0"},
    )
    assert default.stdout.strip() == "1" and chosen.stdout.strip() == "0", default.stderr + chosen.stderr
