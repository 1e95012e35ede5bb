"""Tracking: Cell Tracking Challenge folders (read and write) and linking of per-frame labels into tracks."""
