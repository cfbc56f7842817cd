"""Sample-quality measurement: Inception and classifier features, FID/KID, conditional accuracy."""
