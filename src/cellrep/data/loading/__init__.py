"""From shards to batches: the split, the streams, the shared-memory hand-off, normalization."""
