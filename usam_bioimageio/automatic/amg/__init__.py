"""SAM's automatic mask generation (point grid) on our packages."""
