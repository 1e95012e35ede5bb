"""usam_exporters: SAM, MobileSAM and µSAM checkpoints -> families of tested bioimage.io packages."""
