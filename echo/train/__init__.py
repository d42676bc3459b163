"""Training: the Session protocol, Ray launching, checkpoints, losses, pretraining, fine-tuning and Tune search."""
