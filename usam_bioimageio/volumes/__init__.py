"""Volumes: the multicut solver and µSAM's merge of per-slice instance labels into 3D objects."""
