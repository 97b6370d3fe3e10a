"""Import-time compatibility shims, imported before timm/torchvision.

torchvision 0.28.0 is the only release for torch 2.13.0 and ships CUDA-only
compiled ops. On a CPU torch its extension cannot load, and its module-level
``register_fake("torchvision::nms")`` then raises because the op schema was
never defined, so ``import torchvision`` (and therefore ``import timm``) fails.
When the compiled extension cannot be loaded we define the ``nms``/``qnms``
schemas ourselves; cellrep never calls those ops. When it loads, it defines
the real schemas and nothing is patched.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # the schemas live as long as this Library object


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _load_torchvision_extension() -> bool:
    """True when torchvision is absent or its compiled ops load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    package_dir = list(spec.submodule_search_locations)[0]
    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    global _library
    if _library is not None or all(_has_schema(n) for n in _SCHEMAS):
        return
    if _load_torchvision_extension():
        return
    _library = torch.library.Library("torchvision", "DEF")
    for name, schema in _SCHEMAS.items():
        if not _has_schema(name):
            _library.define(schema)


ensure_torchvision_importable()


def silence_known_library_warnings() -> None:
    """Filter, by exact message and module, warnings that libraries raise about each other.

    lightning 2.6's ``utilities/_pytree.py`` builds ``LeafSpec()``, which torch 2.13 deprecates, on every
    batch it flattens: a FutureWarning per run that names no cellrep code and that no cellrep change
    removes (lightning has to move to ``treespec_leaf()``). Drop this filter with that lightning release.
    """
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


silence_known_library_warnings()
