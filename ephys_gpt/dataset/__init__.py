"""Chunk store, datasets, splitters and loaders."""
