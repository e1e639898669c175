"""vargen: visual autoregressive image generation on one config system."""

__version__ = "0.1.0"
