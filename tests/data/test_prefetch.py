"""Batches built ahead in a thread: the same batches in the same order as the bare pipeline,
and the state of the batches taken (not built), so a resume from it is exact."""
import threading

import numpy as np
import pytest

from pathways.data import prefetch
from tests.data import test_pipeline


class _Counting:
  """A pipeline of numbered batches; raises at batch `fail_at`."""

  def __init__(self, fail_at=None):
    self.i, self.fail_at = 0, fail_at

  def __next__(self):
    if self.i == self.fail_at:
      raise RuntimeError(f'bad example in batch {self.i}')
    self.i += 1
    return {'x': np.array([self.i])}

  def get_state(self):
    return str(self.i).encode()


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_batches_in_order_and_state_of_the_batches_taken(depth):
  p = prefetch.Prefetcher(_Counting(), depth)
  assert p.get_state() == b'0'
  for want in range(1, 6):
    assert int(next(p)['x'][0]) == want
    assert p.get_state() == str(want).encode()  # the thread may have built more by now
  if depth:
    deadline = threading.Event()
    deadline.wait(0.2)
    assert p.pipeline.i >= 5  # built ahead (up to depth + 1 more)
  p.close()
  if depth:
    assert not p._thread.is_alive()  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match=r'next\(\) after close\(\)'):
      next(p)  # never silently skipping the batches that were built ahead


def test_an_error_in_the_thread_reaches_the_loop_at_its_batch():
  p = prefetch.Prefetcher(_Counting(fail_at=2), 2)
  next(p), next(p)
  with pytest.raises(RuntimeError, match='bad example in batch 2'):
    next(p)
  assert p.get_state() == b'2'
  with pytest.raises(RuntimeError, match='after an error'):
    next(p)
  p.close()


def test_bad_depth_is_refused():
  with pytest.raises(ValueError, match=r"prefetch depth=-1: must be an int >= 0"):
    prefetch.Prefetcher(_Counting(), -1)


def test_real_pipeline_resumes_exactly_from_the_prefetched_state(data_dir):
  bare = test_pipeline._pipe(data_dir)
  expected = [next(bare) for _ in range(6)]
  p = prefetch.Prefetcher(test_pipeline._pipe(data_dir), 2)
  got = [next(p) for _ in range(3)]
  state = p.get_state()
  p.close()
  resumed = test_pipeline._pipe(data_dir)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(3)]
  for want, have in zip(expected, got):
    for k in want:
      np.testing.assert_array_equal(have[k], want[k])
