"""MedVL-SAM2 library."""
