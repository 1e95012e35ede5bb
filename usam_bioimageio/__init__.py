"""usam_bioimageio: run Segment Anything for Microscopy (µSAM) bioimage.io packages.

The public API is re-exported here lazily so that ``import usam_bioimageio`` imports neither torch nor
onnxruntime.
"""

__version__ = "0.1.0"
