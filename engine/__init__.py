"""Running experiments: backend checks, run directories, metrics and the training loop."""
