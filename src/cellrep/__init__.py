"""cellrep: representation learning and biological benchmarks for cell-microscopy screens."""

from cellrep import _compat  # noqa: F401  (must run before anything imports timm/torchvision)

__version__ = "0.1.0"
