"""Writers of small datasets in the real on-disk formats, shared by tests (tests/ is on sys.path)."""
