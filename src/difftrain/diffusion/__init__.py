"""Noise schedules, training targets and loss weighting. Never imports training code."""
