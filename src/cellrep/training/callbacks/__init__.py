"""Lightning callbacks of cellrep: atomic checkpoints, throughput and size, MAE reconstruction images."""
