"""Model factories."""
