"""Scores: metrics, FID/KID, evaluating runs, exports and folders, periodic scoring during
training, and the health checks of a run (monitor during training, doctor after)."""
