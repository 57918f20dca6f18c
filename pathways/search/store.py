"""The search's files: JSON read and written atomically, configs from saved dicts."""
from __future__ import annotations

import json
import os

import ml_collections

from pathways.train import experiment


def read(path, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write(path, obj):
  """Atomic JSON write (a crash leaves the old file or the new one)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(path + '.tmp', path)


def config(d) -> ml_collections.ConfigDict:
  """A config from its saved dict (upgraded to today's keys)."""
  return experiment.upgrade(ml_collections.ConfigDict(d))
