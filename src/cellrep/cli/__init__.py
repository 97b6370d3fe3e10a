"""Entry points: the four Hydra mains (``train``, ``shard``, ``probe``, ``evaluate``) and what a run
needs around them (exit handling, run directory, resume, the reports people read)."""
