"""Packing a source into WebDataset shards once: the writer, per-plate statistics, bad-input report."""
