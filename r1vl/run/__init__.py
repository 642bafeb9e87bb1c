"""Step 5, log, and around the loop: run setup, checkpoints and resume, metrics, plots."""
