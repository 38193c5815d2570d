"""Training: stage plans, the training config, and (to come) the accelerate trainer."""
