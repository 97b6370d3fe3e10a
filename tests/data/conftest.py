"""Tiny in-test ImageSources and a session-wide shards directory for the data tests."""

from __future__ import annotations

import cellrep  # noqa: F401  (before anything imports torchvision)

# isort: split
import numpy as np
import pandas as pd
import pytest

from cellrep.data.schema import make_site_id, validate_metadata

GENES = ("g0", "g1", "g2", "g3")


class TinySource:
    """A few experiments × plates; per plate 2 control wells + one well per gene, 2 sites each."""

    def __init__(
        self,
        cell_types=("HUVEC", "RPE"),
        experiments_per_type=3,
        plates=1,
        sites=2,
        size=16,
        channels=3,
        seed=0,
        fingerprint="tiny-v1",
        name="tiny",
        genes=GENES,
        fail_at=None,
        bad_site=None,
        with_dataset=False,
    ):
        rows = []
        for ct in cell_types:
            for e in range(1, experiments_per_type + 1):
                exp = f"{ct}-{e:02d}"
                for p in range(1, plates + 1):
                    wells = [("B02", "EMPTY_control"), ("B03", "EMPTY_control")]
                    wells += [(f"C{i + 2:02d}", g) for i, g in enumerate(genes)]
                    for well, pert in wells:
                        ctrl = pert == "EMPTY_control"
                        for s in range(1, sites + 1):
                            rows.append(
                                {
                                    "site_id": make_site_id(exp, p, well, s),
                                    "experiment": exp,
                                    "plate": p,
                                    "well": well,
                                    "site": s,
                                    "cell_type": ct,
                                    "perturbation": pert,
                                    "perturbation_type": "control" if ctrl else "siRNA",
                                    "concentration": float("nan"),
                                    "well_type": "negative_control" if ctrl else "treatment",
                                }
                            )
        meta = pd.DataFrame(rows)
        if with_dataset:
            meta["dataset"] = np.where(meta["experiment"].str.endswith("01"), "test", "train")
        self.metadata = validate_metadata(meta, name)
        self.name, self.fingerprint = name, fingerprint
        self.channel_names = tuple(f"ch{i}" for i in range(channels))
        rng = np.random.default_rng(seed)
        self.images = {
            sid: rng.integers(0, 256, (channels, size, size), dtype=np.uint8) for sid in self.metadata["site_id"]
        }
        self.fail_at, self.bad_site, self.loads = fail_at, bad_site, 0

    def load(self, site_id: str) -> np.ndarray:
        self.loads += 1
        if site_id == self.fail_at:
            raise OSError(f"disk error reading {site_id}")
        if site_id == self.bad_site:
            return self.images[site_id].astype(np.uint16)
        return self.images[site_id]


@pytest.fixture(scope="session")
def make_source():
    """The TinySource class (a fixture: test modules cannot import this conftest by name)."""
    return TinySource


@pytest.fixture(scope="session")
def tiny_source():
    return TinySource()


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_source):
    """72 sites (6 experiments × 12) in 5-sample shards, written once per session."""
    from cellrep.data.shards.writer import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(tiny_source, out, samples_per_shard=5, progress=False)
    return out
