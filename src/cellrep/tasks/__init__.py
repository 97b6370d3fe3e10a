"""Tasks: LightningModules that train a backbone (supervised, later MAE)."""
