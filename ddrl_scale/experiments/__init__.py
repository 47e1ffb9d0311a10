"""Experiments that validate the algorithm (not part of the training data flow)."""
