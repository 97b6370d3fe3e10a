"""Tasks: the LightningModules that train a backbone (supervised classification, MAE pretraining)."""
