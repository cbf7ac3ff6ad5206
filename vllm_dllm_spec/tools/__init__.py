"""Maintenance tools: training and evaluating the bundled tiny SDAR checkpoints."""
