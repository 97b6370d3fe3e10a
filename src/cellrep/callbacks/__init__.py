"""Lightning callbacks of cellrep (reconstruction images for MAE runs)."""
