"""nn.Modules of MedVL-SAM2 (no file I/O, no per-user state): vision, projector, language, segmenter, the
unified model; ``weights.py`` builds them and loads real checkpoints."""
