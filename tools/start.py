"""The start of a config-driven tool's `main`: no stray arguments, TFDS quiet unless asked,
every task plugin discovered. Returns the `--config` flag's file name (path[:args])."""
from __future__ import annotations

from absl import app
from absl import flags
from absl import logging

from pathways import registry


def start(argv) -> str:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # TFDS logs at INFO
    logging.set_verbosity(logging.WARNING)
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  registry.discover()
  return config_flags.get_config_filename(flags.FLAGS['config'])
