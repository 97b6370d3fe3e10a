"""Gene-relationship annotations: the known answers of the relationship-recall benchmark.

An annotation file is a CSV with header ``entity1,entity2`` (HGNC symbols).
Public files list pairs in both orders and include self-pairs, so every
consumer must see the same cleaned set (sorted, de-duplicated); recall counts
differ otherwise. The permissively licensed sources ship inside the package
(``cellrep/resources/annotations``); others (CORUM, SIGNOR, in-house) are
passed by path.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError

SHIPPED: tuple[str, ...] = ("StringDB", "HuMAP", "Reactome")
EXPECTED_HEADER = ("entity1", "entity2")
_GUIDE_SUFFIX = r"_guide_\d+$"  # RxRx3-style per-guide names: GENE_guide_3


def shipped_annotation_dir() -> Path:
    """The package's annotation folder, found through the import system.

    ``importlib.resources`` resolves inside the installed package, so this
    works the same from an editable checkout and from a wheel install.
    """
    resource = importlib.resources.files("cellrep").joinpath("resources", "annotations")
    return Path(str(resource))


def resolve_annotation_path(name_or_path: str | Path) -> Path:
    """Map a shipped source name (``StringDB``) or a filesystem path to a file path."""
    text = str(name_or_path)
    if text in SHIPPED:
        path = shipped_annotation_dir() / f"{text}.txt"
        if not path.is_file():
            raise CellrepError(
                f"shipped annotation '{text}' is missing from the installed package ({path})",
                fix="reinstall cellrep; the package data under cellrep/resources was not installed",
            )
        return path
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise CellrepError(
        f"unknown annotation source '{text}': not a shipped name and no such file",
        fix=f"use one of the shipped sources {list(SHIPPED)}, or give the path of a CSV "
        "file with header 'entity1,entity2'",
    )


def load_pairs(name_or_path: str | Path) -> pd.DataFrame:
    """Load annotated gene pairs as a clean, undirected, duplicate-free table.

    Returns columns ``gene_a, gene_b`` (str) with ``gene_a < gene_b`` in every
    row, whitespace stripped, self-pairs and empty names dropped.
    """
    path = resolve_annotation_path(name_or_path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise CellrepError(
            f"annotation file {path} is not a readable CSV: {exc}",
            fix="the file must be a CSV with header 'entity1,entity2'",
        ) from None
    columns = tuple(c.strip() for c in raw.columns)
    if columns != EXPECTED_HEADER:
        raise CellrepError(
            f"annotation file {path} has columns {list(columns)}, expected exactly entity1,entity2",
            fix="make the first line of the file the header 'entity1,entity2' "
            "(one gene symbol per column, one pair per row)",
        )
    first = raw.iloc[:, 0].str.strip().to_numpy(dtype=object)
    second = raw.iloc[:, 1].str.strip().to_numpy(dtype=object)
    keep = (first != "") & (second != "") & (first != second)
    first, second = first[keep], second[keep]
    swap = second < first
    pairs = pd.DataFrame(
        {
            "gene_a": np.where(swap, second, first),
            "gene_b": np.where(swap, first, second),
        }
    )
    pairs = pairs.drop_duplicates().sort_values(["gene_a", "gene_b"], kind="stable")
    return pairs.astype({"gene_a": str, "gene_b": str}).reset_index(drop=True)


def strip_guide_suffix(symbols: pd.Series) -> pd.Series:
    """Turn per-guide perturbation names (``GENE_guide_3``) into gene symbols (``GENE``).

    Only the exact lowercase ``_guide_<n>`` suffix is removed; gene symbols are
    case-sensitive and are left untouched otherwise.
    """
    return symbols.astype(str).str.replace(_GUIDE_SUFFIX, "", regex=True)
