"""cospress: distill vision foundation models with CosPress from a cached teacher feature store."""

__version__ = "0.1.0"
