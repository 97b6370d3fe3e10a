"""Drawing synthetic microscopy sites: cells as textured blobs, then the microscope.

A site's biology is one vector ``z`` in a standardized *morphology space*
(0 = the average cell; one unit ≈ a clearly visible change). Perturbations,
cell types and batches are shifts of ``z``; :func:`render_site` turns ``z``
into pixels. Keeping the biology a plain vector is what lets the generator
plant known answers (modules share a direction, compounds copy their target).
The microscope (:class:`Acquisition`) then adds what an experiment changes
without changing biology: per-channel gain/offset, uneven illumination, focus.

Everything is vectorized NumPy over ``cells × patch × patch``; the only loop is
over channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

# Morphology parameters shared by all channels, then two per channel.
GLOBAL_PARAMS: tuple[str, ...] = (
    "nucleus_size",
    "cell_density",
    "cytoplasm_ratio",
    "elongation",
    "texture_scale",
    "organelle_spots",
    "nucleoli_spots",
    "membrane_width",
    "clustering",
    "organelle_position",  # spatial arrangement: organelle spots packed around the nucleus or out at the edge
)
# What each channel stains. Channel 1 is always nuclei (Hoechst/DAPI); the rest
# cycle through the RxRx1 / Cell Painting stains so any channel count works.
NUCLEUS_ROLE = "nucleus"
OTHER_ROLES: tuple[str, ...] = ("cytoplasm", "membrane", "rna", "organelles", "golgi")


def channel_roles(num_channels: int) -> tuple[str, ...]:
    return (NUCLEUS_ROLE,) + tuple(OTHER_ROLES[i % len(OTHER_ROLES)] for i in range(num_channels - 1))


def parameter_names(num_channels: int) -> tuple[str, ...]:
    per_channel = [f"intensity_w{c + 1}" for c in range(num_channels)]
    per_channel += [f"texture_w{c + 1}" for c in range(num_channels)]
    return GLOBAL_PARAMS + tuple(per_channel)


def num_parameters(num_channels: int) -> int:
    return len(GLOBAL_PARAMS) + 2 * num_channels


def morphology_mask(num_channels: int) -> np.ndarray:
    """True for the parameters a phenotype may move: every global one and the per-channel textures.

    The per-channel intensities are left to cell type and batch. Each channel's mean and spread are
    also fixed per site before the microscope (:func:`render_cells`). A perturbation therefore shows in
    shape, size, texture, arrangement and cell count, and pooled intensity statistics cannot read it
    (docs/data.md, "The synthetic screen").
    """
    mask = np.ones(num_parameters(num_channels), dtype=bool)
    mask[len(GLOBAL_PARAMS) : len(GLOBAL_PARAMS) + num_channels] = False
    return mask


# How strongly phenotypes load on each kind of parameter: on what a 40-pixel site shows clearly
# (sizes, shape, count, arrangement) more than on spot counts and per-channel texture amplitude, which
# the fixed per-channel spread and the focus blur leave hard to see.
SPOT_WEIGHT, CHANNEL_TEXTURE_WEIGHT = 0.6, 0.4


def phenotype_weights(num_channels: int) -> np.ndarray:
    """Per parameter, how much a phenotype direction may load on it (0 where :func:`morphology_mask` is False)."""
    weights = morphology_mask(num_channels).astype(np.float64)
    for name in ("organelle_spots", "nucleoli_spots"):
        weights[GLOBAL_PARAMS.index(name)] = SPOT_WEIGHT
    weights[len(GLOBAL_PARAMS) + num_channels :] = CHANNEL_TEXTURE_WEIGHT
    return weights


@dataclass(frozen=True)
class Acquisition:
    """One experiment's imaging conditions (the batch effect, minus biology)."""

    gain: np.ndarray  # (C,) multiplicative per-channel gain
    offset: np.ndarray  # (C,) additive per-channel background, in [0, 1] units
    gradient: np.ndarray  # (2,) illumination slope along (y, x), relative
    blur_sigma: float  # focus blur, pixels
    gamma: np.ndarray  # (C,) detector response light**gamma: nonlinear, so affine normalization cannot undo it

    @staticmethod
    def neutral(num_channels: int) -> "Acquisition":
        return Acquisition(np.ones(num_channels), np.zeros(num_channels), np.zeros(2), 0.0, np.ones(num_channels))

    @staticmethod
    def random(num_channels: int, strength: float, rng: np.random.Generator) -> "Acquisition":
        gain = np.exp(strength * 0.3 * rng.standard_normal(num_channels))
        offset = strength * 0.04 * np.abs(rng.standard_normal(num_channels))
        angle = rng.uniform(0, 2 * np.pi)
        gradient = strength * rng.uniform(0.2, 0.5) * np.array([np.sin(angle), np.cos(angle)])
        blur = strength * rng.uniform(0.2, 0.8)
        gamma = np.exp(strength * 0.25 * rng.standard_normal(num_channels))
        return Acquisition(gain, offset, gradient, float(blur), gamma)


def _physical(z: np.ndarray) -> dict[str, float]:
    """Map standardized morphology ``z`` onto drawing parameters (pixels, counts).

    Each parameter is log-linear in its ``z`` and clipped to a range where the
    drawing stays valid, so any perturbation strength renders (it saturates).
    """
    g = dict(zip(GLOBAL_PARAMS, z[: len(GLOBAL_PARAMS)]))

    def bounded(base: float, slope: float, name: str, lo: float, hi: float) -> float:
        return float(np.clip(base * np.exp(slope * g[name]), lo, hi))

    return {
        "nucleus_radius": bounded(3.0, 0.2, "nucleus_size", 1.5, 8.0),
        "cells_per_4096px": bounded(18.0, 0.3, "cell_density", 2.0, 60.0),
        "cytoplasm_ratio": bounded(2.1, 0.15, "cytoplasm_ratio", 1.4, 4.0),
        "elongation": bounded(1.35, 0.25, "elongation", 1.0, 4.0),
        "texture_sigma": bounded(1.2, 0.3, "texture_scale", 0.5, 5.0),
        "organelle_spots": bounded(7.0, 0.35, "organelle_spots", 0.5, 40.0),
        "nucleoli_spots": bounded(2.5, 0.35, "nucleoli_spots", 0.2, 12.0),
        "membrane_width": bounded(1.1, 0.25, "membrane_width", 0.4, 4.0),
        "clustering": float(1.0 / (1.0 + np.exp(-np.clip(g["clustering"] - 1.0, -30, 30)))),
        # 0: spots hug the nucleus, 1: they sit at the cell edge (the organelle ring's inner radius)
        "organelle_position": float(1.0 / (1.0 + np.exp(-np.clip(0.8 * g["organelle_position"], -30, 30)))),
    }


CELL_BRIGHTNESS = 0.3  # log-scale spread of stain uptake between the cells of one site
SITE_LEVEL_JITTER = 0.1  # per-site, per-channel jitter of a channel's mean and spread (log scale)
SPREAD_PER_LEVEL = 0.8  # a channel's pixel std as a multiple of its mean, before the microscope


def _soft_step(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _spot_image(xs: np.ndarray, ys: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian spots of peak ≈1 at the given positions (deposit, then one blur)."""
    h, w = shape
    xi, yi = np.rint(xs).astype(np.int64), np.rint(ys).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    counts = np.bincount(yi[inside] * w + xi[inside], minlength=h * w).reshape(h, w)
    return gaussian_filter(counts.astype(np.float32), sigma) * (2 * np.pi * sigma**2)


def _cell_spots(rng, cx, cy, angle, ax_long, ax_short, mean_count, rho_lo, rho_hi, shape, sigma):
    """Spots placed inside each cell's ellipse at radial fraction ``rho_lo..rho_hi``."""
    counts = rng.poisson(mean_count, size=cx.shape[0])
    owner = np.repeat(np.arange(cx.shape[0]), counts)
    phi = rng.uniform(0, 2 * np.pi, owner.shape[0])
    rho = np.sqrt(rng.uniform(rho_lo**2, rho_hi**2, owner.shape[0]))
    a, b = rho * np.cos(phi) * ax_long[owner], rho * np.sin(phi) * ax_short[owner]
    c, s = np.cos(angle[owner]), np.sin(angle[owner])
    return _spot_image(cx[owner] + a * c - b * s, cy[owner] + a * s + b * c, shape, sigma)


def render_cells(
    z: np.ndarray, num_channels: int, size: int, rng: np.random.Generator, blur_sigma: float = 0.0
) -> np.ndarray:
    """Fluorescence (C×H×W float, roughly 0..1) of one site with morphology ``z``, through a focus blur
    of ``blur_sigma`` pixels (the microscope's, :class:`Acquisition`)."""
    p = _physical(z)
    h = w = size
    n = max(1, int(rng.poisson(p["cells_per_4096px"] * h * w / 4096.0)))
    cx, cy = rng.uniform(-2, w + 2, n), rng.uniform(-2, h + 2, n)
    clustered = rng.random(n) < p["clustering"]
    focus = rng.uniform(0.2 * size, 0.8 * size, 2)
    cx = np.where(clustered, focus[1] + rng.normal(0, size / 7, n), cx)
    cy = np.where(clustered, focus[0] + rng.normal(0, size / 7, n), cy)
    radius = p["nucleus_radius"] * np.exp(0.1 * rng.standard_normal(n))
    aspect = p["elongation"] * np.exp(0.1 * rng.standard_normal(n))
    angle = rng.uniform(0, np.pi, n)

    # Each cell is drawn on its own square patch around its centre (memory O(cells·patch²),
    # not O(cells·H·W)), then patches are merged into the image by maximum.
    half = int(np.ceil(radius.max() * p["cytoplasm_ratio"] * np.sqrt(aspect.max()))) + 3
    offsets = np.arange(-half, half + 1)
    px = np.floor(cx).astype(np.int64)[:, None, None] + offsets[None, None, :]
    py = np.floor(cy).astype(np.int64)[:, None, None] + offsets[None, :, None]
    dx, dy = px - cx[:, None, None], py - cy[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    along, across = dx * c + dy * s, -dx * s + dy * c
    r = radius[:, None, None]
    cell_r = r * p["cytoplasm_ratio"]
    stretch, nuc_stretch = np.sqrt(aspect)[:, None, None], (aspect**0.25)[:, None, None]
    u_cell = np.sqrt((along / stretch) ** 2 + (across * stretch) ** 2) / cell_r
    u_nuc = np.sqrt((along / nuc_stretch) ** 2 + (across * nuc_stretch) ** 2) / r
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = (py * w + px)[inside]

    def merge(patches: np.ndarray) -> np.ndarray:
        image = np.zeros(h * w, dtype=np.float32)
        np.maximum.at(image, flat, patches[inside].astype(np.float32))
        return image.reshape(h, w)

    # Cells of one site differ in how much stain they take up, so brightness is a per-cell trait, not a phenotype.
    bright = np.exp(CELL_BRIGHTNESS * rng.standard_normal(n))[:, None, None]
    nucleus_shape = _soft_step((1.0 - u_nuc) * r / 0.8)
    nucleus, nucleus_mask = merge(nucleus_shape * bright), merge(nucleus_shape)
    cytoplasm = merge(_soft_step((1.0 - u_cell) * cell_r / 1.2) * bright)
    membrane = merge(np.exp(-(((1.0 - u_cell) * cell_r / p["membrane_width"]) ** 2)))
    perinuclear = merge(np.exp(-(((u_nuc - 1.4) * r / 1.5) ** 2))) * cytoplasm

    ax_cell = (radius * p["cytoplasm_ratio"] * np.sqrt(aspect), radius * p["cytoplasm_ratio"] / np.sqrt(aspect))
    inner = 1.1 / p["cytoplasm_ratio"]  # just outside the nucleus, as a fraction of the cell radius
    lo = inner + (0.8 - inner) * p["organelle_position"]
    organelles = _cell_spots(rng, cx, cy, angle, *ax_cell, p["organelle_spots"], lo, lo + 0.2, (h, w), 0.9)
    ax_nuc = (radius * aspect**0.25, radius / aspect**0.25)
    nucleoli = _cell_spots(rng, cx, cy, angle, *ax_nuc, p["nucleoli_spots"], 0.0, 0.6, (h, w), 1.0)

    cyto_only = cytoplasm * (1.0 - 0.7 * nucleus_mask)
    role_images = {
        NUCLEUS_ROLE: 1.6 * nucleus,
        "cytoplasm": cyto_only,
        "membrane": 0.8 * membrane + 0.25 * cytoplasm,
        "rna": 0.35 * cyto_only + 0.35 * nucleus + 0.6 * nucleoli * nucleus,
        "organelles": 0.15 * cyto_only + 0.8 * organelles * cyto_only,
        "golgi": 0.6 * perinuclear + 0.4 * membrane + 0.1 * cyto_only,
    }
    k = len(GLOBAL_PARAMS)
    intensity = np.clip(0.3 * np.exp(0.3 * z[k : k + num_channels]), 0.02, 1.5)
    texture = np.clip(0.35 * np.exp(0.35 * z[k + num_channels : k + 2 * num_channels]), 0.0, 2.0)
    roles = channel_roles(num_channels)
    noise = gaussian_filter(
        rng.standard_normal((num_channels, h, w)).astype(np.float32), (0, *[p["texture_sigma"]] * 2)
    )
    noise /= noise.std(axis=(1, 2), keepdims=True) + 1e-6
    out = np.stack([role_images[role] for role in roles]) * np.clip(1.0 + texture[:, None, None] * noise, 0.0, None)
    if blur_sigma > 0.05:  # focus blurs before the levels are set, so blur cannot turn shape into spread
        out = gaussian_filter(out, sigma=(0, blur_sigma, blur_sigma))
    # Every channel leaves with a set mean (its intensity, jittered per site) and spread (a fixed multiple
    # of the mean): what a phenotype changes is where the signal is, never how much of it there is. So
    # per-channel mean/std carry cell type and batch, and no label (docs/data.md).
    level = intensity * np.exp(SITE_LEVEL_JITTER * rng.standard_normal(num_channels))
    spread = SPREAD_PER_LEVEL * level * np.exp(SITE_LEVEL_JITTER * rng.standard_normal(num_channels))
    mean = out.mean(axis=(1, 2), keepdims=True)
    std = out.std(axis=(1, 2), keepdims=True) + 1e-6
    out = (out - mean) / std * spread[:, None, None] + level[:, None, None]
    return np.clip(out, 0.0, None).astype(np.float32)


def acquire(clean: np.ndarray, acquisition: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Detect ``clean`` (already through the focus blur): illumination, detector response, gain/offset,
    noise → uint8."""
    _, h, w = clean.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    illumination = 1.0 + acquisition.gradient[0] * (yy / h - 0.5) + acquisition.gradient[1] * (xx / w - 0.5)
    light = (clean + 0.03) * illumination[None]
    light = np.clip(light, 0.0, None) ** acquisition.gamma[:, None, None]
    light = light * acquisition.gain[:, None, None] + acquisition.offset[:, None, None]
    light += rng.standard_normal(light.shape).astype(np.float32) * (0.008 + 0.02 * np.sqrt(np.clip(light, 0, None)))
    return np.clip(np.rint(light * 255.0), 0, 255).astype(np.uint8)


def render_site(
    z: np.ndarray, num_channels: int, size: int, acquisition: Acquisition, rng: np.random.Generator
) -> np.ndarray:
    """One site: ``C×H×W`` uint8 for morphology ``z`` seen through ``acquisition``."""
    return acquire(render_cells(z, num_channels, size, rng, acquisition.blur_sigma), acquisition, rng)
