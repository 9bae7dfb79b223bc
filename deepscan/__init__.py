"""deepscan: deepfake video detection with spatial-temporal long-distance attention."""

__version__ = "0.1.0"
