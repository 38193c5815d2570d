"""Dataset readers: CT-RATE (reports, metadata, VQA, volume layout) and M3D-Seg."""
