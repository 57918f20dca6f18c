"""pathways: one model of routed components trained on many tasks at once."""

__version__ = '0.1.0'
