"""Data, by stage (docs/data.md): ``sources`` read a dataset in its own format, ``shards`` pack it
once into WebDataset shards, ``loading`` splits the shards and turns them into batches.
``schema`` is the canonical data model every stage shares."""
