"""Data: sources that read a dataset's own format, shards, splits and loaders."""
