"""Lightning machinery: tasks (LightningModules), callbacks, optimizer, strategy, the few-shot protocol."""
