"""Batches built ahead in a background thread, with exact resume.

The pipeline (`pipeline.MultitaskPipeline`) builds each batch in Python on the host; the
train loop would otherwise wait for it between steps. `Prefetcher` runs the pipeline in a
daemon thread that keeps up to `depth` finished batches in a queue, each with the pipeline's
state right after it. The loop sees the same batches in the same order, and
`get_state()` is the state after the last batch the loop *took* (not the last one built),
so a checkpoint saved at step s resumes at batch s + 1 exactly as without prefetching.

An exception in the thread is raised by the `next()` that would have returned its batch.
`close()` stops the thread (it is a daemon: a process exiting never waits for it). A `next()`
after either raises: the batches built ahead are gone, so continuing would skip them.
"""
from __future__ import annotations

import queue
import threading


DEFAULT_DEPTH = 2  # `config.data.prefetch` where a config leaves it out


class Prefetcher:
  """Iterator over `pipeline`'s batches, `depth` built ahead (depth 0: no thread)."""

  def __init__(self, pipeline, depth: int = DEFAULT_DEPTH):
    if not isinstance(depth, int) or depth < 0:
      raise ValueError(f'prefetch depth={depth!r}: must be an int >= 0.')
    self.pipeline = pipeline
    self.depth = depth
    self._state = pipeline.get_state()
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._fill, name='pathways-prefetch', daemon=True)
      self._thread.start()

  def _fill(self):
    while not self._stop.is_set():
      try:
        item = (next(self.pipeline), self.pipeline.get_state(), None)
      except BaseException as e:  # pylint: disable=broad-except
        item = (None, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._thread is None:
      batch = next(self.pipeline)
      self._state = self.pipeline.get_state()
      return batch
    if self._stop.is_set():  # closed, or an error was raised: the thread built ahead
      raise RuntimeError('Prefetcher: next() after close() or after an error in the pipeline '
                         '(the batches built ahead are gone); make a new one from the state.')
    batch, state, error = self._queue.get()
    if error is not None:
      self._stop.set()
      raise error
    self._state = state
    return batch

  def get_state(self) -> bytes:
    """The pipeline's state after the last batch returned by `next`."""
    return self._state

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5.0)
