"""Known-relationship recall (docs/benchmarks.md "Relationship recall").

Do genes that annotation databases (StringDB, HuMAP, Reactome, CORUM, SIGNOR)
say are related sit unusually close — or unusually far — in the embedding?
A pair counts when its cosine falls in either tail of the distribution of all
gene–gene cosines, so a random embedding recalls ≈ the tail mass (0.10 at
5/95) whatever its geometry.

At genome scale (18,000 genes: 162 million null cosines) neither the G × G
matrix nor the sorted null is built. The rank rule only ever asks how a pair's
cosine compares with a few order statistics of the null (one or two per
threshold), so those are found by selection in row blocks (:class:`_Null`):
float32 cosines locate each order statistic in a histogram, and the float64
cosines of the few pairs that float32 rounding could put on either side of it
decide its exact value. Results equal the float64 full-matrix computation
(tests/eval/test_recall_scale.py). Memory: two blocks (≈ 200 MB), plus the
float32 null between the two passes while it fits in 1 GiB (≈ 23,000 genes).
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cellrep.annotations import SHIPPED, load_pairs, strip_guide_suffix
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings, unit_rows

log = logging.getLogger(__name__)
THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))


def threshold_key(lo: float, hi: float) -> str:
    return f"{lo:g}/{hi:g}"


def gene_embeddings(emb: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Mean corrected embedding per gene (docs/benchmarks.md: aggregate per perturbation, mean).

    Uses treatment wells of genetic perturbations; per-guide names
    (``GENE_guide_3``) are stripped to the gene symbol first, so guides of one
    gene pool into one row. Returns (sorted gene symbols, genes × D).
    """
    sub = emb.subset(emb.genetic_mask())
    if len(sub.meta) == 0:
        raise CellrepError(
            "no genetic-perturbation treatment wells to compute recall on",
            fix="recall needs wells with perturbation_type siRNA or CRISPR and well_type treatment",
        )
    genes = strip_guide_suffix(sub.meta["perturbation"]).to_numpy(dtype=str)
    names, inverse = np.unique(genes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # wells grouped by gene: one reduceat, no np.add.at
    counts = np.bincount(inverse, minlength=len(names))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sums = np.add.reduceat(sub.features[order].astype(np.float64), starts, axis=0)
    return names, sums / counts[:, None]


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    unit = unit_rows(x)
    return unit @ unit.T


# Histogram of the null over s = cosine + 3 ∈ [2, 4), where a float's exponent is fixed, so the top
# mantissa bits are the bin: 2^18 equal bins of width 2/2^18 ≈ 7.6e-6 from one shift, no division.
_BITS = 18
_BINS = 1 << _BITS
_WIDTH = 2.0 / _BINS
_BLOCK = 1 << 23  # null cosines per row block (≈ 100 MB of buffers; two sets, in turn)
_ROWS = 1024  # at most, so the lower triangle computed and dropped stays small
_KEEP = 1 << 30  # bytes of pass-1 float32 cosines kept for pass 2 instead of a second product


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn (umap-learn's)
    except ImportError:  # without it BLAS keeps its threads: slower on a busy machine, same results
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _bins(s: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Bin of every value of ``s`` (float32 or float64) into ``out`` (int64): monotone non-decreasing in s."""
    ints, shift = (np.int32, 23 - _BITS) if s.dtype == np.float32 else (np.int64, 52 - _BITS)
    two = int(np.array(2.0, dtype=s.dtype).view(ints)) >> shift
    np.right_shift(s.view(ints), shift, out=out)
    out -= two
    return np.clip(out, 0, _BINS - 1, out=out)  # below 2 (cos < −1) and from 4 on: the two edge bins


def _dots(unit: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 12) -> np.ndarray:
    """float64 cosines of the pairs (i, j), i < j: the one routine behind every value the rank rule compares.

    Row-wise products summed along the row, so a pair's value depends only on its two rows (duplicate
    genes tie exactly, as they do in the full matrix), whatever else is computed with it.
    """
    out = np.empty(len(i))
    for k in range(0, len(i), chunk):
        out[k : k + chunk] = (unit[i[k : k + chunk]] * unit[j[k : k + chunk]]).sum(axis=1)
    return out


class _Null:
    """The upper triangle (k = 1) of the G × G cosine matrix as the rank rule sees it: pair values and
    exact order statistics of the sorted null, computed block by block, never sorted.

    ``cos`` given: the values are that matrix's (``pair_recall``). Else ``unit`` (G × D float64 unit
    rows): blocks are float32 products, each within ``err`` of the float64 cosine of :func:`_dots`
    (rounding of the rows, plus a D-term float32 sum in any order: ≤ (D + 2)·2⁻²⁴), and every value
    the rule compares is a float64 one from :func:`_dots`.
    """

    def __init__(self, n_genes: int, cos: np.ndarray | None = None, unit: np.ndarray | None = None):
        self.g, self.cos, self.unit = n_genes, cos, unit
        self.n = n_genes * (n_genes - 1) // 2
        if unit is not None:
            self.u32 = unit.astype(np.float32)
            # float32 error of a cosine, plus the rounding of s = c + 3 (half an ulp below 4.0001)
            self.err = 1.01 * (unit.shape[1] + 4) * 2.0**-24 + 2.0**-22
        else:
            self.err = 0.0  # the matrix's own values are binned and compared
        self.margin = 0 if self.err == 0 else int(np.ceil(2 * self.err / _WIDTH)) + 1
        self._cut: dict[int, float] = {}

    def values(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.cos[a, b] if self.unit is None else _dots(self.unit, a, b)

    def _blocks(self, kept: list | None = None):
        """(first row, approximate values, their bins) per row block of the upper triangle; the
        diagonal and below get bin _BINS, which no count or window includes. Same blocks every call.

        A worker thread computes the next block (BLAS and ufuncs release the GIL) while the caller
        counts or selects in this one: two sets of buffers, used in turn. ``kept``: an empty list is
        filled with each block's float32 values; a filled one is read instead of multiplying again.
        """
        g = self.g
        plan, i0 = [], 0
        while i0 < g - 1:
            r = max(1, min(g - i0 - 1, _BLOCK // (g - i0), _ROWS))
            plan.append((i0, r))
            i0 += r
        size = max(min(_BLOCK, g * g), g)  # a block is at least one row
        dtype = np.float64 if self.unit is None else np.float32
        bufs = [(np.empty(size, dtype), np.empty(size, np.int64)) for _ in range(2)]  # intp: bincount, take
        lower = np.tri(min(g, _ROWS), dtype=bool)  # diagonal and below of a block's leading square
        reuse = kept is not None and len(kept) == len(plan)

        def block(n: int):
            s = kept[n] if reuse else None
            return self._block(*plan[n], *bufs[n % 2], lower, s)

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(block, 0)
            for n, (i0, _) in enumerate(plan):
                approx, bins = pending.result()
                if kept is not None and not reuse:
                    kept.append(approx.copy())
                if n + 1 < len(plan):
                    pending = pool.submit(block, n + 1)
                yield i0, approx, bins

    def _block(self, i0: int, r: int, buf: np.ndarray, idx: np.ndarray, lower: np.ndarray, s=None):
        w = self.g - i0
        b = idx[: r * w].reshape(r, w)
        if s is not None:  # kept from the first pass
            pass
        elif self.unit is None:
            s = buf[: r * w].reshape(r, w)
            block = self.cos[i0 : i0 + r, i0:]
            if not np.isfinite(block).all():
                raise CellrepError(
                    "the cosine matrix has NaN or infinite values", fix="pass finite cosines (no NaN rows)"
                )
            np.add(block, 3.0, out=s)
        else:
            s = buf[: r * w].reshape(r, w)
            np.matmul(self.u32[i0 : i0 + r], self.u32[i0:].T, out=s)
            s += np.float32(3.0)
        _bins(s, b)
        b[:, :r][lower[:r, :r]] = _BINS
        return (self.cos[i0 : i0 + r, i0:] if self.unit is None else s), b

    def cuts(self, ranks) -> dict[int, float]:
        """rank k (0-based) → the k-th smallest null value, exactly; all new ranks in two passes."""
        todo = sorted({int(k) for k in ranks} - set(self._cut))
        if todo:
            self._cut.update(self._select(np.array(todo)))
        return {int(k): self._cut[int(k)] for k in ranks}

    def _select(self, ranks: np.ndarray) -> dict[int, float]:
        # one BLAS thread: the worker's product and this thread's counting already fill 2 cores, and
        # BLAS threads waiting for a core on a busy machine cost more than they bring
        with _one_blas_thread():
            return self._select_in_two_passes(ranks)

    def _select_in_two_passes(self, ranks: np.ndarray) -> dict[int, float]:
        hist = np.zeros(_BINS + 1, np.int64)
        # the embeddings' float32 cosines are kept for pass 2 when they fit (18,000 genes: 650 MB)
        kept = [] if self.unit is not None and 4 * (self.n + self.g * _ROWS) <= _KEEP else None
        for _, _, b in self._blocks(kept):  # pass 1: where each rank falls
            hist += np.bincount(b.ravel(), minlength=_BINS + 1)
        cum = np.cumsum(hist[:_BINS])
        target = np.searchsorted(cum, ranks, side="right")  # bin holding the k-th value
        lo, hi = np.maximum(target - self.margin, 0), np.minimum(target + self.margin, _BINS - 1)
        group = np.full(_BINS + 1, -1, np.int32)  # merged windows of bins, around each target bin
        starts = []
        for a, b in zip(lo, hi, strict=True):
            if starts and a <= starts[-1][1] + 1:
                starts[-1][1] = max(starts[-1][1], b)
            else:
                starts.append([a, b])
        for n_group, (a, b) in enumerate(starts):
            group[a : b + 1] = n_group
        want = group >= 0
        mask = np.empty(max(min(_BLOCK, self.g * self.g), self.g), bool)
        found: list[list[tuple[np.ndarray, ...]]] = [[] for _ in starts]  # per window: values, rows, columns
        for i0, approx, b in self._blocks(kept):  # pass 2: the values in the windows, with their pairs
            flat = np.flatnonzero(np.take(want, b.ravel(), out=mask[: b.size]))
            gid = group[b.ravel()[flat]]
            order = np.argsort(gid, kind="stable")
            edges = np.searchsorted(gid[order], np.arange(len(starts) + 1))
            row, col = np.divmod(flat[order], b.shape[1])
            val = approx[row, col]  # float32 (embeddings) or the matrix's float64
            row, col = (i0 + row).astype(np.int32), (i0 + col).astype(np.int32)
            for n_group in np.flatnonzero(np.diff(edges)):
                sl = slice(edges[n_group], edges[n_group + 1])
                found[n_group].append((val[sl], row[sl], col[sl]))
        out, windows = {}, {}
        for k, t in zip(ranks, target, strict=True):
            n_group = int(group[t])
            if n_group not in windows:
                windows[n_group] = tuple(np.concatenate(parts) for parts in zip(*found[n_group], strict=True))
                found[n_group] = []
            val, ii, jj = windows[n_group]
            a, b = starts[n_group]
            below = int(cum[a - 1]) if a > 0 else 0
            if len(val) != int(hist[a : b + 1].sum()):
                raise RuntimeError("recall null: the cosine blocks differed between the two passes")
            out[int(k)] = self._exact(int(k) - below, val.astype(np.float64), ii, jj, (a, b))
        return out

    def _exact(self, t: int, val: np.ndarray, ii: np.ndarray, jj: np.ndarray, window) -> float:
        """The t-th smallest exact value of one window's pairs, given their approximate values."""
        star = float(np.partition(val, t)[t])  # the window holds the k-th approximate value exactly
        if self.err == 0:
            return star
        # order statistics move at most err when every value does: only pairs within 2·err of the
        # approximate one can be on either side of the exact one, so only they get float64 cosines
        e = 2 * self.err
        lo_bin, hi_bin = (int((v - 2.0) / _WIDTH) for v in (star - e, star + e))
        if (lo_bin < window[0] and window[0] > 0) or (hi_bin > window[1] and window[1] < _BINS - 1):
            raise RuntimeError("recall null: a selection window is narrower than the float32 error")
        below = int(np.count_nonzero(val < star - e))
        near = (val >= star - e) & (val <= star + e)
        exact = _dots(self.unit, ii[near], jj[near])
        return float(np.partition(exact, t - below)[t - below])


def _rank_cuts(lo: float, hi: float, n: int) -> tuple[int, int]:
    """The rank rule as two counts: recalled ⇔ #null ≤ q is ≤ k_lo, or #null < q is ≥ k_hi.

    k_lo is the largest k in [−1, n] with k/n ≤ lo and k_hi the smallest k in [0, n + 1] with
    k/n ≥ hi, the same float divisions and comparisons as ``searchsorted(...)/n <= lo``.
    """
    k_lo = min(max(int(np.floor(lo * n)), -1), n)
    while k_lo + 1 <= n and (k_lo + 1) / n <= lo:
        k_lo += 1
    while k_lo >= 0 and k_lo / n > lo:
        k_lo -= 1
    k_hi = min(max(int(np.ceil(hi * n)), 0), n + 1)
    while k_hi - 1 >= 0 and (k_hi - 1) / n >= hi:
        k_hi -= 1
    while k_hi <= n and k_hi / n < hi:
        k_hi += 1
    return k_lo, k_hi


def _pair_indices(genes: np.ndarray, pairs: pd.DataFrame) -> np.ndarray:
    """Annotated pairs with both genes present, as (a < b) gene indices, de-duplicated."""
    index = pd.Index(genes)
    a = index.get_indexer(pairs["gene_a"].astype(str))
    b = index.get_indexer(pairs["gene_b"].astype(str))
    keep = (a >= 0) & (b >= 0) & (a != b)
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    ab = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), dtype=int)
    if len(ab) == 0:
        raise CellrepError(
            f"no annotated pair has both genes among the {len(genes)} embedded genes (e.g. {', '.join(genes[:3])})",
            fix="check that perturbation names are gene symbols (case-sensitive) "
            "matching the annotation file, or use another annotation source",
        )
    return ab


def _recall(genes: np.ndarray, null: _Null, pairs: pd.DataFrame, thresholds) -> dict:
    if len(genes) < 2:
        raise CellrepError(f"recall needs at least 2 genes, got {len(genes)}", fix="embed more gene perturbations")
    ab = _pair_indices(genes, pairs)
    n = null.n
    rules = [_rank_cuts(float(lo), float(hi), n) for lo, hi in thresholds]
    cut = null.cuts([k for k_lo, k_hi in rules for k in (k_lo, k_hi - 1) if 0 <= k < n])
    q = null.values(ab[:, 0], ab[:, 1])
    out = {"n_pairs": int(len(ab)), "n_genes": int(len(genes)), "n_null": int(n)}
    for (lo, hi), (k_lo, k_hi) in zip(thresholds, rules, strict=True):
        # #null ≤ q ≤ k_lo ⇔ q < null[k_lo];  #null < q ≥ k_hi ⇔ q > null[k_hi − 1]  (null sorted)
        low = q < cut[k_lo] if 0 <= k_lo < n else np.full(len(q), k_lo >= n)
        high = q > cut[k_hi - 1] if 1 <= k_hi <= n else np.full(len(q), k_hi == 0)
        out[threshold_key(lo, hi)] = float(np.mean(low | high))
    return out


def pair_recall(genes: np.ndarray, cos: np.ndarray, pairs: pd.DataFrame, thresholds=THRESHOLDS) -> dict:
    """Two-sided recall of annotated pairs against the all-pairs null (docs/benchmarks.md, exactly).

    Null: the upper triangle (k=1) of the gene–gene cosine matrix, sorted, N
    values. For each annotated pair with both genes present (de-duplicated,
    self-pairs dropped) and cosine q: ``r_lo = searchsorted(null, q, "right")/N``,
    ``r_hi = searchsorted(null, q, "left")/N``; recalled at (lo, hi) when
    ``r_lo <= lo or r_hi >= hi``. Recall = recalled / annotated pairs present.
    The null is neither copied nor sorted: the few order statistics the rule
    needs are selected from ``cos`` in row blocks.
    """
    genes = np.asarray(genes, dtype=str)
    if cos.shape != (len(genes), len(genes)):
        raise CellrepError(
            f"cosine matrix {cos.shape} does not match {len(genes)} genes", fix="pass one row and column per gene"
        )
    return _recall(genes, _Null(len(genes), cos=np.asarray(cos, dtype=np.float64)), pairs, thresholds)


def source_name(source: str | Path) -> str:
    text = str(source)
    return text if text in SHIPPED else Path(text).stem


def load_sources(sources) -> dict[str, pd.DataFrame]:
    """name → cleaned pairs; ``sources`` is a list of shipped names / paths, or such a dict already loaded."""
    if isinstance(sources, dict):
        return sources
    return {source_name(s): load_pairs(s) for s in sources}  # bad files (wrong columns, no file) raise here


def recall_benchmark(emb: Embeddings, sources=SHIPPED, thresholds=THRESHOLDS) -> dict:
    """Recall per annotation source (shipped names or paths, or :func:`load_sources`' dict) with the
    number of pairs used.

    A source with no annotated pair among the embedded genes is reported as
    skipped (with the reason); if that happens to every source it is an error.
    The G × G cosine matrix is never built and the null never sorted (module
    docstring).
    """
    genes, x = gene_embeddings(emb)
    null = _Null(len(genes), unit=unit_rows(x))  # one null for every source: its cuts are selected once
    out, reasons = {}, {}
    for name, pairs in load_sources(sources).items():
        try:
            out[name] = _recall(genes, null, pairs, thresholds)
        except CellrepError as exc:
            reasons[name] = exc.problem
            out[name] = {"n_pairs": 0, "skipped": exc.problem}
            log.warning("recall: %s skipped: %s", name, exc.problem)
    if reasons and len(reasons) == len(out):
        raise CellrepError(
            f"no annotation source has a pair among the {len(genes)} embedded genes: {reasons}",
            fix="check that perturbation names are gene symbols matching the annotation files",
        )
    return out
