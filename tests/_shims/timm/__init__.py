"""Test-only stand-in for the parts of timm that mobile_sam uses (see README)."""
