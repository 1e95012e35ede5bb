"""Automatic instance segmentation: from the outputs of µSAM's decoders to instance label images."""
