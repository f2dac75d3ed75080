"""Client-facing protocols."""
