"""cellrep imports on the CPU torch + CUDA-only torchvision stack, and makes timm importable."""

import subprocess
import sys


def test_import_cellrep_then_timm_in_a_fresh_interpreter():
    code = "import cellrep, timm, torch; m = timm.create_model('resnet18', in_chans=5, num_classes=3).eval(); " \
           "print(m(torch.zeros(1, 5, 32, 32)).shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 3])" in out.stdout
