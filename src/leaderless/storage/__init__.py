"""Local storage: the ``Store`` interface (store.py) and its engines."""
