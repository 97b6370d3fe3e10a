"""Backbones: timm models built for any channel count."""
