"""Image embeddings as values: plain, tiled and per-slice types, computing them, the persistent cache and micro-sam's caches."""
