"""Annotation pairs: shipped sources are found from any install, and every file is cleaned alike."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import cellrep
from cellrep.annotations import SHIPPED, load_pairs, resolve_annotation_path, strip_guide_suffix
from cellrep.errors import CellrepError


def write_pairs(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sources_resolve_inside_the_package_and_load_clean(name):
    path = resolve_annotation_path(name)
    assert path.is_file()
    assert Path(cellrep.__file__).parent in path.parents
    pairs = load_pairs(name)
    assert list(pairs.columns) == ["gene_a", "gene_b"]
    assert len(pairs) > 10_000
    assert (pairs["gene_a"] < pairs["gene_b"]).all()
    assert not pairs.duplicated().any()
    raw = pd.read_csv(path)
    assert len(pairs) < len(raw)  # the raw files list most pairs in both orders


def test_load_pairs_strips_sorts_and_deduplicates(tmp_path):
    path = write_pairs(
        tmp_path / "mine.csv",
        "entity1,entity2\n"
        " TP53 ,MDM2\n"  # whitespace
        "MDM2,TP53\n"  # reversed duplicate
        "TP53,TP53\n"  # self-pair
        "ATM,CHEK2\n"
        "ATM,CHEK2\n"  # exact duplicate
        "atm,CHEK2\n",  # different symbol: case matters
    )
    pairs = load_pairs(path)
    as_tuples = set(map(tuple, pairs.to_numpy().tolist()))
    assert as_tuples == {("MDM2", "TP53"), ("ATM", "CHEK2"), ("CHEK2", "atm")}
    assert len(pairs) == 3
    assert all(isinstance(g, str) for g in pairs["gene_a"])
    assert load_pairs(str(path)).equals(pairs)  # str and Path accepted alike


def test_wrong_header_names_the_expected_header(tmp_path):
    path = write_pairs(tmp_path / "bad.csv", "gene1,gene2\nA,B\n")
    with pytest.raises(CellrepError, match="entity1,entity2"):
        load_pairs(path)
    three = write_pairs(tmp_path / "three.csv", "entity1,entity2,score\nA,B,0.9\n")
    with pytest.raises(CellrepError, match="entity1,entity2"):
        load_pairs(three)


def test_unknown_source_lists_shipped_names_and_accepts_paths(tmp_path):
    with pytest.raises(CellrepError) as info:
        resolve_annotation_path("STRING_v12")
    message = str(info.value)
    assert all(name in message for name in SHIPPED)
    assert "path" in message
    with pytest.raises(CellrepError):
        resolve_annotation_path(tmp_path / "nope.csv")
    mine = write_pairs(tmp_path / "CORUM.txt", "entity1,entity2\nA,B\n")
    assert resolve_annotation_path(str(mine)) == mine


def test_strip_guide_suffix_only_removes_the_exact_suffix():
    names = pd.Series(["TP53_guide_3", "MDM2", "ATM_guide_12", "Kras_guide_1", "BRCA1_Guide_2", "X_guide_"])
    assert strip_guide_suffix(names).tolist() == ["TP53", "MDM2", "ATM", "Kras", "BRCA1_Guide_2", "X_guide_"]


def test_shipped_files_are_found_from_a_plain_copy_of_the_package(tmp_path):
    """A non-editable install is just the package folder on sys.path; the files must come with it."""
    package = Path(cellrep.__file__).parent
    shutil.copytree(package, tmp_path / "site" / "cellrep", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import cellrep, cellrep.annotations as a; "
        "p = a.resolve_annotation_path('Reactome'); "
        "print(cellrep.__file__); print(p); print(len(a.load_pairs('Reactome')))"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module_file, resolved, count = done.stdout.split()
    assert Path(module_file).is_relative_to(tmp_path / "site")
    assert Path(resolved).is_relative_to(tmp_path / "site")
    assert int(count) == len(load_pairs("Reactome"))
