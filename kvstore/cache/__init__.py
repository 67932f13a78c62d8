"""The cache codec: mlx-lm cache objects <-> stored pieces, chunk keys, model fingerprints, sliding-window capture."""
