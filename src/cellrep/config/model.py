"""Schema of the model group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from cellrep.config.checks import at_least
from cellrep.errors import CellrepError


@dataclass
class ModelConfig:
    name: str = MISSING  # any timm model name
    img_size: Optional[int] = None  # ViTs: the input size (defaults to data.crop_size)
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    # cell-type context vectors (cellrep.knowledge.context): a CSV cell_type,v0,v1,...; "synthetic": derived
    # from the synthetic screen's generator; null: none. ViTs get an extra token, CNNs FiLM on pooled features.
    context_path: Optional[str] = None

    def __post_init__(self) -> None:
        from cellrep.models.backbone import check_model_name

        check_model_name(self.name)
        if self.img_size is not None:
            at_least("model.img_size", self.img_size, 1)
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise CellrepError(f"model.drop_path_rate={self.drop_path_rate} is not in [0, 1)", fix="e.g. 0.1")
