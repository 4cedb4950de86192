"""edgepipe: a trained model in, a small, fast, verified edge artifact out."""

__version__ = "0.1.0"
