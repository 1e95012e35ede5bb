"""Files in and out: images (one reader), prompt files, data sets with splits, downloads, overlays."""
