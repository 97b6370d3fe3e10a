"""Biological knowledge as plain functions and data (docs/FEWSHOT.md); no Lightning here.

* :mod:`cellrep.knowledge.graph` — gene interaction graphs (STRING, Hetionet,
  the shipped ``entity1,entity2`` annotation files) as a weighted adjacency
  over a dataset's perturbations;
* :mod:`cellrep.knowledge.graph_loss` — the losses that use that graph, on a
  batch's perturbation means;
* :mod:`cellrep.knowledge.context` — a context vector per cell type (from a
  file; for the synthetic screen derived from the generator);
* :mod:`cellrep.knowledge.inputs` — from the config to the tensors a task takes.

The de novo protocol that trains with them is :mod:`cellrep.training.fewshot`.
"""
