"""Evaluation against CT-RATE and M3D-Seg: metrics (text, multiple choice, segmentation)."""
