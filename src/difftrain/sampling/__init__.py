"""Sampling: schedulers by name, classifier-free guidance, per-image seeds, image grids.

Never imports training code, so a trained model samples without the training stack.
"""
