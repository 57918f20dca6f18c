"""SIGTERM and Ctrl-C: a run stops cleanly at any moment.

Before training starts (imports, compilation, restoring) there is nothing to save: the
launcher installs `exit_cleanly_on_signal` first thing, so such a signal ends the process
with status 0 and a line saying so; it leaves with `os._exit`, since an exception raised from
a signal handler lands in whatever code runs (a class body under import turns SystemExit into
RuntimeError). From the first step on, `Stop` takes over: the step in
flight finishes, the state is saved, the process exits 0. Both restore the previous
handlers when done, also when the run fails.
"""
from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit(signum, frame):
  del frame
  print(f'{signal.Signals(signum).name} before training started: nothing to save; exiting.',
        flush=True)
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access


def exit_cleanly_on_signal() -> None:
  """SIGTERM/SIGINT exit with status 0 until `Stop` replaces this handler."""
  for sig in SIGNALS:
    try:
      signal.signal(sig, _exit)
    except ValueError:  # not the main thread
      pass


class Stop:
  """SIGTERM / Ctrl-C during training: finish the step in flight, save, exit."""

  def __init__(self):
    self.requested = None
    self._old = {}
    for sig in SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def agreed(self):
    """The stop request, agreed by every process (signals reach hosts at different steps;
    a process that saves while another steps would wait on it forever)."""
    import jax  # pylint: disable=g-import-not-at-top  (this module loads before jax)
    import numpy as np  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.requested is not None))
    if np.any(flags):
      self.requested = self.requested or 'SIGTERM (another process)'
    return self.requested

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
