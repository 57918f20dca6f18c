"""pathways: one model of routed components trained on many tasks at once."""

__version__ = '0.1.0'

from pathways.registry import discover, get_task, register_task  # noqa: E402,F401
