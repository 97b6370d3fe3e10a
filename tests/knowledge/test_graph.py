"""Graph loaders: STRING, Hetionet and annotation files → adjacency over a dataset's perturbations."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest

from cellrep.errors import CellrepError
from cellrep.knowledge.graph import load_graph, perturbation_graph


def write(path, text):
    path.write_text(text)
    return path


def test_string_scores_are_scaled_symmetrized_and_deduplicated(tmp_path):
    path = write(
        tmp_path / "links.txt",
        "protein1 protein2 combined_score\nTP53 MDM2 900\nMDM2 TP53 800\nTP53  CDKN1A   400\nMDM2 MDM2 999\n",
    )
    graph = load_graph(path)
    assert graph.format == "string"
    pg = perturbation_graph(graph, ["MDM2", "TP53", "CDKN1A"])
    expected = np.array([[0, 0.9, 0], [0.9, 0, 0.4], [0, 0.4, 0]])
    np.testing.assert_allclose(pg.weights, expected)  # max over both orders; self-loop dropped
    assert pg.missing == [] and pg.present.all()


def test_string_weights_already_in_unit_range_are_kept(tmp_path):
    path = write(tmp_path / "links.txt", "protein1 protein2 combined_score\nA B 0.25\n")
    np.testing.assert_allclose(perturbation_graph(load_graph(path), ["A", "B"]).weights[0, 1], 0.25)


def test_string_protein_ids_map_to_symbols_through_protein_info(tmp_path):
    links = write(tmp_path / "links.txt", "protein1 protein2 combined_score\n9606.ENSP1 9606.ENSP2 700\n")
    info = write(
        tmp_path / "info.txt",
        "#string_protein_id\tpreferred_name\tprotein_size\tannotation\n"
        "9606.ENSP1\tTP53\t393\tx\n9606.ENSP2\tMDM2\t491\ty\n",
    )
    unmapped = perturbation_graph(load_graph(links), ["TP53", "MDM2"])
    assert unmapped.num_edges == 0 and unmapped.missing == ["TP53", "MDM2"]
    mapped = perturbation_graph(load_graph(links, nodes=info), ["TP53", "MDM2"])
    assert mapped.weights[0, 1] == pytest.approx(0.7)


def test_hetionet_keeps_gene_gene_interactions_and_maps_names(tmp_path):
    edges = tmp_path / "hetionet-v1.0-edges.sif.gz"
    with gzip.open(edges, "wt") as f:
        f.write(
            "source\tmetaedge\ttarget\n"
            "Gene::7157\tGiG\tGene::4193\n"
            "Gene::7157\tGcG\tGene::1026\n"  # covaries: not an interaction, dropped by default
            "Compound::DB00001\tCbG\tGene::1026\n"
            "Biological Process::GO:0071357\tGpBP\tGene::7157\n"
        )
    nodes = write(
        tmp_path / "nodes.tsv",
        "id\tname\tkind\nGene::7157\tTP53\tGene\nGene::4193\tMDM2\tGene\n"
        "Gene::1026\tCDKN1A\tGene\nCompound::DB00001\tLepirudin\tCompound\n",
    )
    pg = perturbation_graph(load_graph(edges, nodes=nodes), ["TP53", "MDM2", "CDKN1A"])
    assert pg.weights[0, 1] == 1.0 and pg.num_edges == 1
    assert pg.missing == ["CDKN1A"]  # only in a dropped edge: not a node of the interaction graph
    with_covariation = perturbation_graph(
        load_graph(edges, nodes=nodes, metaedges=("GiG", "GcG")), ["TP53", "MDM2", "CDKN1A"]
    )
    assert with_covariation.num_edges == 2
    by_entrez = perturbation_graph(load_graph(edges), ["7157", "4193"])  # no node table: Entrez ids
    assert by_entrez.weights[0, 1] == 1.0


def test_annotation_pairs_guides_and_case_sensitive_matching(tmp_path, caplog):
    path = write(tmp_path / "pairs.csv", "entity1,entity2\nTP53,MDM2\nMDM2,TP53\nTP53,TP53\n")
    perts = ["TP53_guide_1", "TP53_guide_2", "MDM2", "mdm2", "CMPD-01", "EMPTY_control"]
    with caplog.at_level(logging.WARNING, logger="cellrep.knowledge.graph"):
        pg = perturbation_graph(load_graph(path), perts)
    assert pg.missing == ["mdm2", "CMPD-01", "EMPTY_control"]
    assert "3 of 6 perturbations are absent" in caplog.text and "CMPD-01" in caplog.text
    assert pg.weights[0, 2] == pg.weights[1, 2] == 1.0  # both guides of TP53 link to MDM2
    assert pg.weights[0, 1] == 1.0  # guides of one gene are joined
    assert pg.weights[:, 3].sum() == 0 and np.allclose(pg.weights, pg.weights.T)
    assert np.all(np.diag(pg.weights) == 0)


def test_shipped_annotation_name_is_a_graph():
    graph = load_graph("StringDB")
    assert graph.format == "annotation" and len(graph.edges) > 1000
    assert (graph.edges["weight"] == 1.0).all()


def test_unknown_columns_name_the_expected_ones(tmp_path):
    path = write(tmp_path / "edges.tsv", "gene_a\tgene_b\tscore\nA\tB\t1\n")
    with pytest.raises(
        CellrepError, match="(?s)gene_a.*protein1 protein2 combined_score.*source metaedge target.*entity1,entity2"
    ):
        load_graph(path)


def test_bad_scores_and_missing_files_and_bad_node_tables_are_clear(tmp_path):
    bad = write(tmp_path / "links.txt", "protein1 protein2 combined_score\nA B high\n")
    with pytest.raises(CellrepError, match="combined_score 'high'"):
        load_graph(bad)
    with pytest.raises(CellrepError, match="does not exist"):
        load_graph(tmp_path / "nope.txt")
    good = write(tmp_path / "ok.txt", "protein1 protein2 combined_score\nA B 500\n")
    nodes = write(tmp_path / "nodes.tsv", "gene\tlabel\nA\tX\n")
    with pytest.raises(CellrepError, match="id column"):
        load_graph(good, nodes=nodes)


def test_shuffled_graph_keeps_edges_and_degrees_but_connects_other_genes(tmp_path):
    genes = [f"G{i}" for i in range(12)]
    cliques = [genes[i : i + 4] for i in (0, 4, 8)]  # 3 cliques of 4: 18 edges
    lines = [f"{a},{b}" for c in cliques for i, a in enumerate(c) for b in c[i + 1 :]]
    path = write(tmp_path / "pairs.csv", "entity1,entity2\n" + "\n".join(lines) + "\n")
    perts = [*genes, "G0_guide_2", "OFFGRAPH"]  # a second guide of G0 and a gene outside the graph
    true = perturbation_graph(load_graph(path), perts)
    shuffled = perturbation_graph(load_graph(path), perts, shuffle_seed=0)
    assert shuffled.num_edges == true.num_edges
    degree = lambda w: sorted((w[:12] > 0).sum(1))  # noqa: E731
    assert degree(shuffled.weights) == degree(true.weights)
    assert (shuffled.weights[12] == shuffled.weights[0]).sum() == len(perts) - 2  # the guide moves with its gene
    assert shuffled.weights[0, 12] == 1.0 and shuffled.weights[13].sum() == 0  # off-graph stays unconnected
    kept = np.count_nonzero(np.triu((true.weights > 0) & (shuffled.weights > 0), 1))
    assert kept < true.num_edges / 2  # most edges now join genes of different cliques
    again = perturbation_graph(load_graph(path), perts, shuffle_seed=0).weights
    np.testing.assert_array_equal(again, shuffled.weights)
    other = perturbation_graph(load_graph(path), perts, shuffle_seed=1).weights
    assert not np.array_equal(other, shuffled.weights)


def test_graph_inputs_report_the_shuffled_control(tmp_path):
    from omegaconf import OmegaConf

    from cellrep.knowledge.inputs import graph_inputs

    path = write(tmp_path / "pairs.csv", "entity1,entity2\nA,B\nC,D\nE,F\nG,H\n")
    task = OmegaConf.create(
        {"graph_loss": "graph_contrastive", "graph_weight": 0.1, "graph_temperature": 0.1, "graph_path": str(path)}
    )
    perts = list("ABCDEFGH")
    kwargs, report = graph_inputs(task, perts)
    assert report["graph_edges"] == 4 and "graph_shuffle_seed" not in report
    task.graph_shuffle_seed = 3
    shuffled_kwargs, shuffled = graph_inputs(task, perts)
    assert shuffled["graph_shuffle_seed"] == 3 and shuffled["graph_edges"] == 4
    true_pairs = kwargs["graph_weights"] > 0
    kept = int((true_pairs & (shuffled_kwargs["graph_weights"] > 0)).triu(1).sum())
    assert shuffled["graph_true_edges_kept"] == kept < 4
