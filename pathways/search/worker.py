"""A search worker: trains and scores one candidate folder, then exits.

  python -m pathways.search.worker --worker=FOLDER [--parent=PID]

Started by `candidates.run_workers`; with --parent it ends (SIGTERM: the train loop saves
and exits) when the search process dies, so a killed search leaves no orphans.
"""
from __future__ import annotations

import ctypes
import os
import signal

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def die_with_parent(parent: int):
  """This process gets SIGTERM when `parent` dies (Linux PR_SET_PDEATHSIG)."""
  try:
    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # it died before the call
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.parent:
    die_with_parent(FLAGS.parent)
  from pathways.search import candidates  # pylint: disable=g-import-not-at-top
  candidates.run_candidate(FLAGS.worker)


if __name__ == '__main__':
  flags.DEFINE_string('worker', None, 'The candidate folder (holds spec.json).', required=True)
  flags.DEFINE_integer('parent', 0, 'The search process this worker serves.')
  app.run(main)
