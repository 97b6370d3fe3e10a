"""Biological knowledge for de novo cell lines (DESIGN §6).

* :mod:`cellrep.knowledge.graph` — gene interaction graphs (STRING, Hetionet,
  the shipped ``entity1,entity2`` annotation files) as a weighted adjacency
  over a dataset's perturbations;
* :mod:`cellrep.knowledge.context` — a context vector per cell type (from a
  file; for the synthetic screen derived from the generator);
* :mod:`cellrep.training.fewshot` — the de novo protocol: train on the other
  cell types, fine-tune on k shots of the held-out one, test on the rest.

The losses that use the graph live in :mod:`cellrep.knowledge.graph_loss`.
"""
