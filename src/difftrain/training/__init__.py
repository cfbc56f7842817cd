"""Training: the loop, its set-up, the step, checkpoints and resume, previews, evaluation hooks and the end of a run."""
