"""Prompted segmentation: decoder inputs, prediction on plain or tiled embeddings, µSAM's iterative prompt sampling."""
