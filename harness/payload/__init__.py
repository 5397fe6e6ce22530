"""Layer 1: building.  A scenario (steps, data blobs, extra assembly) becomes a bootable image."""
