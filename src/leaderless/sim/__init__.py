"""Deterministic simulator running the same core code."""
