"""Cell-type-specific modulation of perturbation effects in the synthetic screen (docs/data.md).

A knock-down does not look the same in every cell line. With strength ``m`` =
``cell_type_modulation`` > 0, each cell type ``c`` draws one transform of morphology space
from the screen seed, and every perturbation's shift (genes, compounds, positive controls;
negative controls have none) in a site of type ``c`` becomes ``T_c · shift`` before the
experiment's distortion:

    T_c = g_c · R_c
    g_c = exp(GAIN_SPREAD · m · ε_c),         ε_c ~ N(0, 1)
    R_c = expm(m · A_c) on the K phenotype parameters (morphology_mask), identity on the rest
    A_c = (B_c − B_cᵀ) / √(2K),               B_c ~ N(0, 1)^(K×K)

``A_c`` is skew-symmetric, so ``R_c`` is a rotation; the 1/√(2K) makes its angles O(1)
whatever K is, so the rotation grows with ``m``. For a random direction x the cosine of
``R_a x`` and ``R_b x`` (one gene in two cell types) averages tr(R_aᵀR_b)/K: 0.86 at m = 0.4,
0.53 at 0.8 and 0.22 at 1.2 for the K = 16 of six channels (for large K it tends to
J₁(2√2·m)/(√2·m)). Because one ``T_c`` acts on every perturbation of a cell type, the cosine of
any two perturbations (module mates: about ``module_similarity``) is the same in every cell
type, while a gene's phenotype in a cell type never seen in training is a new vector: the
structure a gene graph describes transfers, the phenotype itself does not.

``m = 0`` gives no transform at all (:func:`cell_type_transform` returns None): the screen
is the one generated before this setting existed, pixel for pixel.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import expm

from cellrep.errors import CellrepError

GAIN_SPREAD = 0.3  # log-scale spread of a cell type's effect gain per unit of modulation
MAX_MODULATION = 2.0  # beyond it the rotation is already an arbitrary mix of the phenotype parameters


def check_strength(strength: float) -> None:
    """Raise the one error for an out-of-range ``data.synthetic.cell_type_modulation``."""
    if not 0.0 <= float(strength) <= MAX_MODULATION:
        raise CellrepError(
            f"data.synthetic.cell_type_modulation={strength} is outside [0, {MAX_MODULATION}]",
            fix="use 0 (every cell type shows a perturbation alike) up to 2; 0.8 makes a held-out cell type new",
        )


def cell_type_transform(strength: float, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """``T_c`` (P×P) for one cell type, drawn from ``rng`` (keyed by the cell type), or None at strength 0.

    ``mask`` (P, bool): the phenotype parameters (``synthetic_cells.morphology_mask``); the
    rotation stays inside them, so a phenotype still never moves a channel's intensity.
    """
    check_strength(strength)
    if strength == 0:
        return None
    mask = np.asarray(mask, dtype=bool)
    k = int(mask.sum())
    gain = np.exp(GAIN_SPREAD * strength * rng.standard_normal())
    b = rng.standard_normal((k, k))
    rotation = np.eye(mask.size)
    rotation[np.ix_(mask, mask)] = expm(strength * (b - b.T) / np.sqrt(2 * k))
    return gain * rotation
