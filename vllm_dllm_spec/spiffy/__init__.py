"""Spiffy: lossless auto-speculation over a calibrated draft graph inside vLLM (README, "Spiffy")."""
