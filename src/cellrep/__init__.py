"""cellrep: representation learning and biological benchmarks for cell-microscopy screens."""

import os

# Large CPU tensors (e.g. the normalized float batches of CPU-only training) on transparent huge pages:
# ~1.7× the CPU loader path (docs/PERFORMANCE.md). torch reads this once, at its first allocation, so it
# takes effect when cellrep is imported before torch (the CLIs); a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from cellrep import _compat  # noqa: E402, F401  (must run before anything imports timm/torchvision)

__version__ = "0.1.0"
