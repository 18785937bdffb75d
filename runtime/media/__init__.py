"""Media preprocessing (images, videos) in numpy + Pillow/PyAV; no torch."""
