"""The recipe: run setup, the step loop, sample-ahead, warm-up, curriculum, checkpoints,
distribution across processes, and evaluation."""
