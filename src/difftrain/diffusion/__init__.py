"""Noise schedules, prediction types, losses and the training objectives (objective.py). Never imports training code."""
