"""The inputs: training records and their images, prompts, the built-in synthetic task."""
