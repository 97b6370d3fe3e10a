"""Evaluation suite (docs/benchmarks.md): per-block probing, well embeddings, batch correction, benchmarks.

Entry points: ``cellrep-probe`` (:mod:`cellrep.cli.probe`) and ``cellrep-eval``
(:mod:`cellrep.cli.evaluate`). Library use, on any well embeddings::

    from cellrep.eval import read_embeddings, correct, recall_benchmark
    emb = correct(read_embeddings("wells.parquet"), "tvn")
    recall_benchmark(emb, ["StringDB", "/data/CORUM.txt"])
"""

from cellrep.eval.batch_correction import METHODS as CORRECTIONS
from cellrep.eval.batch_correction import correct, pca_centerscale, tvn
from cellrep.eval.classification import classification_benchmark
from cellrep.eval.consistency import replicate_consistency
from cellrep.eval.dti import dti_benchmark, load_targets
from cellrep.eval.embeddings import Embeddings, aggregate_wells, read_embeddings
from cellrep.eval.features import block_names, extract_block_features, pooled_block_features
from cellrep.eval.probe import ProbeResult, ProbeSettings, train_probes
from cellrep.eval.ranking import average_precision, roc_auc
from cellrep.eval.recall import gene_embeddings, pair_recall, recall_benchmark

__all__ = [
    "CORRECTIONS",
    "Embeddings",
    "ProbeResult",
    "ProbeSettings",
    "aggregate_wells",
    "average_precision",
    "block_names",
    "classification_benchmark",
    "correct",
    "dti_benchmark",
    "extract_block_features",
    "gene_embeddings",
    "load_targets",
    "pair_recall",
    "pca_centerscale",
    "pooled_block_features",
    "read_embeddings",
    "recall_benchmark",
    "replicate_consistency",
    "roc_auc",
    "train_probes",
    "tvn",
]
