"""µSAM's automatic instance segmentation: the AIS decoder runner and its post-processing."""
