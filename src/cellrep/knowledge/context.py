"""Cell-type context vectors (docs/FEWSHOT.md): what the model knows about a cell line besides its images.

A context file is a CSV with header ``cell_type,<v0>,<v1>,...`` (any names
for the value columns), one row per cell type, e.g. a transcriptomic
embedding of each cell line from a single-cell foundation model. The model
sees a cell type only through its vector, so a de novo cell line needs
nothing but a row in this file.

``model.context_path=synthetic`` derives the file for the synthetic screen:
each cell type's row is the base-morphology shift the generator adds to every
site of that type (:func:`cellrep.data.sources.synthetic.cell_type_base`, the
generator's own function). It is a *stand-in* for a
transcriptomic embedding, and an idealized one: it describes exactly how the
cell type's baseline differs, where a real embedding is a noisy, indirect
description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError
from cellrep.io import atomic_write_text

SYNTHETIC = "synthetic"


def read_context(path: str | Path) -> pd.DataFrame:
    """The context table: index = cell type (str), float columns = the vector."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CellrepError(
            f"context file {path} does not exist",
            fix="set model.context_path to a CSV 'cell_type,v0,v1,...' (or 'synthetic' for the "
            "synthetic screen, or null for no context)",
        )
    try:
        table = pd.read_csv(path, dtype={"cell_type": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CellrepError(
            f"context file {path} is not a readable CSV ({exc})", fix="write it as CSV with header cell_type,v0,v1,..."
        ) from None
    if "cell_type" not in table.columns or len(table.columns) < 2:
        raise CellrepError(
            f"context file {path} has columns {list(table.columns)}",
            fix="the header must be cell_type followed by one column per vector component",
        )
    table["cell_type"] = table["cell_type"].astype(str).str.strip()
    dup = table["cell_type"][table["cell_type"].duplicated()].unique()
    if len(dup):
        raise CellrepError(
            f"context file {path} lists cell type(s) {list(dup)} more than once", fix="keep one row per cell type"
        )
    values = table.drop(columns="cell_type").apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any() or not np.isfinite(values.to_numpy()).all():
        row = table["cell_type"][values.isna().any(axis=1) | ~np.isfinite(values.to_numpy()).all(axis=1)].iloc[0]
        raise CellrepError(
            f"context file {path}: the vector of cell type '{row}' has a missing or non-numeric value",
            fix="every column after cell_type must hold a finite number",
        )
    values.index = table["cell_type"].to_list()
    return values.astype(np.float32)


def context_matrix(path: str | Path, cell_types: Sequence[str]) -> np.ndarray:
    """T×K array: the vectors of ``cell_types`` (in that order); a missing cell type is an error."""
    table = read_context(path)
    missing = [c for c in cell_types if str(c) not in table.index]
    if missing:
        raise CellrepError(
            f"cell type(s) {missing} have no context vector in {path} (it has {list(table.index)})",
            fix=f"add a row per cell type to {path}: the vector describes the cell line to the model",
        )
    return table.loc[[str(c) for c in cell_types]].to_numpy(np.float32)


def synthetic_context(synthetic_cfg) -> pd.DataFrame:
    """The synthetic screen's per-cell-type base morphology shifts (see the module docstring)."""
    from cellrep.data.sources import synthetic
    from cellrep.data.sources.synthetic_cells import num_parameters, parameter_names

    seed = int(synthetic_cfg["seed"])
    channels = len(synthetic_cfg["channel_names"])
    rows = {
        str(c): synthetic.cell_type_base(seed, str(c), num_parameters(channels)) for c in synthetic_cfg["cell_types"]
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(parameter_names(channels)))


def write_context(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a context table as ``cell_type,<columns>`` (atomically)."""
    out = table.rename_axis("cell_type").reset_index()
    atomic_write_text(path, out.to_csv(index=False, float_format="%.6g"))
    return Path(path)
