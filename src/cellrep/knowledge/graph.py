"""Gene interaction graphs as a weighted adjacency over a dataset's perturbations (docs/FEWSHOT.md).

Three file formats are read, told apart by their header line:

* **STRING** links (``protein.links.v12.0.txt[.gz]``): whitespace separated,
  header ``protein1 protein2 combined_score`` (the ``.detailed`` files add
  channel columns, which are ignored). Scores on STRING's 0–1000 scale (any
  score > 1 in the file) are divided by 1000, so weights lie in (0, 1].
  STRING names proteins ``9606.ENSP…``: give its ``protein.info`` table as
  ``nodes`` to map them to gene symbols (``#string_protein_id`` →
  ``preferred_name``); files that already hold symbols need no table.
* **Hetionet** edges (``hetionet-v1.0-edges.sif[.gz]``): tab separated, header
  ``source metaedge target``, node ids like ``Gene::3149``. Only gene–gene
  edges of the chosen metaedges are kept (default ``GiG``, *Gene–interacts–
  Gene*: the protein interactions). The node table
  ``hetionet-v1.0-nodes.tsv`` (``id name kind``) maps ``Gene::3149`` → ``HMGB3``;
  without it the Entrez id after ``Gene::`` is the name. Weight 1 per edge.
* **annotation** CSVs (``entity1,entity2``, the shipped StringDB/HuMAP/Reactome
  files, loaded by :func:`cellrep.annotations.load_pairs`; a shipped name works
  as the path). Weight 1 per pair.

Edges are undirected: a pair listed twice (both orders, or repeated) keeps its
largest weight; self-loops are dropped. Perturbation names are matched to
gene symbols case-sensitively after removing per-guide suffixes
(``GENE_guide_3`` → ``GENE``, as the relationship-recall benchmark does);
guides of one gene are joined with weight 1. A perturbation whose symbol is
not a node of the graph (compounds, controls, unannotated genes) is *absent*:
it is counted, logged and returned, and the losses leave it out, since
absence from a database is not evidence of no interaction.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cellrep.annotations import EXPECTED_HEADER, SHIPPED, load_pairs, resolve_annotation_path, strip_guide_suffix
from cellrep.errors import CellrepError

log = logging.getLogger(__name__)

STRING_COLUMNS = ("protein1", "protein2", "combined_score")
HETIONET_COLUMNS = ("source", "metaedge", "target")
HETIONET_GENE_PREFIX = "Gene::"
HETIONET_METAEDGES = ("GiG",)  # Gene–interacts–Gene; also gene–gene: GcG (covaries), Gr>G (regulates)
NODE_ID_COLUMNS = ("id", "#string_protein_id", "string_protein_id", "protein")
NODE_NAME_COLUMNS = ("name", "preferred_name", "symbol")
FORMATS_HELP = (
    "'protein1 protein2 combined_score' (STRING, whitespace separated), "
    "'source metaedge target' (Hetionet edges, tab separated) or 'entity1,entity2' (annotation CSV)"
)


@dataclass(frozen=True)
class GeneGraph:
    """An undirected weighted gene graph: ``edges`` (gene_a < gene_b, weight in (0, 1]) and all ``nodes``."""

    edges: pd.DataFrame
    nodes: frozenset[str]
    source: str
    format: str


@dataclass(frozen=True)
class PerturbationGraph:
    """The graph restricted to a dataset's perturbations, in the order they were given.

    ``weights`` is P×P, symmetric, zero on the diagonal; ``present[i]`` says
    whether perturbation i is a node of the graph; ``missing`` names the absent ones.
    """

    names: list[str]
    weights: np.ndarray
    present: np.ndarray
    missing: list[str] = field(default_factory=list)

    @property
    def num_edges(self) -> int:
        return int(np.count_nonzero(np.triu(self.weights, 1)))


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _header(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CellrepError(
            f"graph file {path} cannot be read as text ({exc})",
            fix=f"give a text (or .gz) file with header {FORMATS_HELP}",
        ) from None


def detect_format(path: Path) -> str:
    """``string``, ``hetionet`` or ``annotation`` from the header line; anything else is an error."""
    line = _header(path)
    if tuple(c.strip() for c in line.split(",")) == EXPECTED_HEADER:
        return "annotation"
    columns = [c.strip() for c in (line.split("\t") if "\t" in line else line.split())]
    if set(STRING_COLUMNS) <= set(columns):
        return "string"
    if set(HETIONET_COLUMNS) <= set(columns):
        return "hetionet"
    raise CellrepError(
        f"graph file {path} has columns {columns}, which no known graph format has",
        fix=f"give a file whose header is {FORMATS_HELP}",
    )


def _read_table(path: Path, sep: str, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, engine="python" if sep != "\t" else "c")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as exc:
        raise CellrepError(
            f"{what} {path} is not a readable table ({exc})",
            fix=f"check the file; graph files need the header {FORMATS_HELP}",
        ) from None


def read_node_names(path: str | Path) -> dict[str, str]:
    """id → gene symbol from a node table: Hetionet ``id name kind`` or STRING ``protein.info``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CellrepError(
            f"graph node table {path} does not exist",
            fix="point task.graph_nodes at hetionet-v1.0-nodes.tsv or STRING's protein.info file",
        )
    table = _read_table(path, "\t", "graph node table")
    id_col = next((c for c in NODE_ID_COLUMNS if c in table.columns), None)
    name_col = next((c for c in NODE_NAME_COLUMNS if c in table.columns), None)
    if id_col is None or name_col is None:
        raise CellrepError(
            f"graph node table {path} has columns {list(table.columns)}",
            fix=f"a tab-separated table with an id column (one of {list(NODE_ID_COLUMNS)}) and a "
            f"name column (one of {list(NODE_NAME_COLUMNS)}), e.g. Hetionet's 'id name kind'",
        )
    return dict(zip(table[id_col].str.strip(), table[name_col].str.strip()))


def _string_edges(path: Path, names: dict[str, str] | None) -> pd.DataFrame:
    table = _read_table(path, r"\s+", "STRING file")
    score = pd.to_numeric(table["combined_score"], errors="coerce")
    if score.isna().any() or (score < 0).any() or (score > 1000).any():
        bad = table.loc[score.isna() | (score < 0) | (score > 1000), "combined_score"].iloc[0]
        raise CellrepError(
            f"STRING file {path}: combined_score '{bad}' is not a score in 0..1 or 0..1000",
            fix="combined_score must be a number, STRING's 0-1000 scale or a 0-1 weight",
        )
    if len(score) and score.max() > 1:  # STRING's integer scale
        score = score / 1000.0
    a, b = table["protein1"].str.strip(), table["protein2"].str.strip()
    if names is not None:
        a, b = a.map(lambda x: names.get(x, x)), b.map(lambda x: names.get(x, x))
    return pd.DataFrame({"a": a, "b": b, "weight": score.to_numpy(float)})


def _hetionet_edges(path: Path, names: dict[str, str] | None, metaedges: Iterable[str]) -> pd.DataFrame:
    table = _read_table(path, "\t", "Hetionet edge file")
    gene_gene = table["source"].str.startswith(HETIONET_GENE_PREFIX) & table["target"].str.startswith(
        HETIONET_GENE_PREFIX
    )
    keep = gene_gene & table["metaedge"].isin(list(metaedges))
    if gene_gene.any() and not keep.any():
        raise CellrepError(
            f"Hetionet file {path} has no gene-gene edges of metaedges {list(metaedges)} "
            f"(it has {sorted(table.loc[gene_gene, 'metaedge'].unique())})",
            fix="choose metaedges present in the file, e.g. GiG",
        )
    table = table[keep]

    def symbol(ids: pd.Series) -> pd.Series:
        if names is not None:
            return ids.map(lambda x: names.get(x, x.removeprefix(HETIONET_GENE_PREFIX)))
        return ids.str.removeprefix(HETIONET_GENE_PREFIX)

    return pd.DataFrame({"a": symbol(table["source"]), "b": symbol(table["target"]), "weight": np.ones(len(table))})


def resolve_graph_path(path_or_name: str | Path) -> Path:
    """A shipped annotation name (``StringDB``) or an existing file."""
    if str(path_or_name) in SHIPPED:
        return resolve_annotation_path(str(path_or_name))
    path = Path(str(path_or_name)).expanduser()
    if not path.is_file():
        raise CellrepError(
            f"graph file {path} does not exist",
            fix=f"set task.graph_path to a shipped annotation ({', '.join(SHIPPED)}) or to a file "
            f"whose header is {FORMATS_HELP}",
        )
    return path


def load_graph(
    path_or_name: str | Path, nodes: str | Path | None = None, metaedges: Sequence[str] = HETIONET_METAEDGES
) -> GeneGraph:
    """Read a STRING, Hetionet or annotation graph file (see the module docstring for the formats)."""
    path = resolve_graph_path(path_or_name)
    fmt = detect_format(path)
    names = read_node_names(nodes) if nodes is not None else None
    if fmt == "annotation":
        pairs = load_pairs(path)
        raw = pd.DataFrame({"a": pairs["gene_a"], "b": pairs["gene_b"], "weight": np.ones(len(pairs))})
    elif fmt == "string":
        raw = _string_edges(path, names)
    else:
        raw = _hetionet_edges(path, names, metaedges)
    nodes_set = frozenset(raw["a"]) | frozenset(raw["b"])
    raw = raw[(raw["a"] != raw["b"]) & (raw["a"] != "") & (raw["b"] != "") & (raw["weight"] > 0)]
    swap = raw["b"] < raw["a"]
    edges = pd.DataFrame(
        {
            "gene_a": np.where(swap, raw["b"], raw["a"]),
            "gene_b": np.where(swap, raw["a"], raw["b"]),
            "weight": raw["weight"].to_numpy(float),
        }
    )
    edges = edges.groupby(["gene_a", "gene_b"], as_index=False, sort=True)["weight"].max()
    log.info("graph %s (%s): %d nodes, %d undirected edges", path, fmt, len(nodes_set), len(edges))
    return GeneGraph(edges=edges, nodes=frozenset(n for n in nodes_set if n), source=str(path), format=fmt)


def perturbation_graph(
    graph: GeneGraph, perturbations: Sequence[str], shuffle_seed: int | None = None
) -> PerturbationGraph:
    """The symmetric P×P weight matrix of ``graph`` over ``perturbations`` (in that order).

    ``shuffle_seed`` builds the control "any grouping of the labels would do": the genes of the
    dataset that are nodes of the graph trade names by a random permutation, so the matrix keeps the
    graph's edges and degrees among them but connects the wrong genes (guides of one gene stay together).
    """
    names = [str(p) for p in perturbations]
    symbols = strip_guide_suffix(pd.Series(names, dtype=str)).to_list()
    present = np.array([s in graph.nodes for s in symbols], dtype=bool)
    rows_of: dict[str, list[int]] = {}
    for i, s in enumerate(symbols):
        if present[i]:
            rows_of.setdefault(s, []).append(i)
    if shuffle_seed is not None:
        genes = sorted(rows_of)
        order = np.random.default_rng(shuffle_seed).permutation(len(genes))
        rows_of = {genes[k]: rows_of[genes[i]] for i, k in enumerate(order)}
    weights = np.zeros((len(names), len(names)), dtype=np.float64)
    wanted = graph.edges[graph.edges["gene_a"].isin(rows_of) & graph.edges["gene_b"].isin(rows_of)]
    for a, b, w in wanted.itertuples(index=False):
        for i in rows_of[a]:
            for j in rows_of[b]:
                weights[i, j] = weights[j, i] = max(weights[i, j], w)
    for rows in rows_of.values():  # guides of one gene
        for i in rows:
            for j in rows:
                if i != j:
                    weights[i, j] = 1.0
    missing = [n for n, p in zip(names, present) if not p]
    result = PerturbationGraph(names=names, weights=weights, present=present, missing=missing)
    shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
    log.info(
        "graph %s: %d of %d perturbations are nodes, %d edges among them",
        graph.source,
        int(present.sum()),
        len(names),
        result.num_edges,
    )
    if missing:
        log.warning(
            "%d of %d perturbations are absent from the graph %s and get no graph loss: %s",
            len(missing),
            len(names),
            graph.source,
            shown,
        )
    return result
