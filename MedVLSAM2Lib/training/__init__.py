"""Training: the stage YAML config, the paper's freeze plans per stage, and the accelerate trainer."""
