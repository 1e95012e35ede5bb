"""Test-only stand-in for the parts of torchvision that segment_anything / mobile_sam use (see README)."""
