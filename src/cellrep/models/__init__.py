"""Backbones: timm models built for any channel count.

Importing the package registers cellrep's own architectures with timm (the
ViT-L/8 and ViT-G/8 rungs of the ladder, the channel-agnostic ViTs), so a
``model.name`` may name them wherever a timm name is accepted.
"""

from cellrep.models import ca_vit, vit  # noqa: F401  (register models with timm)
