"""Slot ranking: the sort-based ranking equals the one-hot reference and follows GShard priority."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathways.nn import capacity


def test_gshard_priority_first_choices_before_second_then_position():
  # 4 tokens, K=2, E=2, C=2. Choices (first, second):
  #   t0: (0, 1)  t1: (0, 1)  t2: (0, 1)  t3: (1, 0)
  # Choice-major order: t0/k0->e0, t1/k0->e0, t2/k0->e0 (over capacity: dropped), t3/k0->e1,
  # then t0/k1->e1, t1/k1->e1 (e1 full: t3 and t0 took it), t2/k1->e1 dropped, t3/k1->e0 dropped.
  expert = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
  valid = jnp.ones((4, 2), bool)
  slot, kept = capacity.slots_onehot(expert, valid, 2, 2)
  np.testing.assert_array_equal(kept, [[True, True], [True, False], [False, False], [True, False]])
  np.testing.assert_array_equal(jnp.where(kept, slot, -1), [[0, 1], [1, -1], [-1, -1], [0, -1]])


@pytest.mark.parametrize('s,k,e,cf', [(16, 1, 4, 1.0), (32, 2, 8, 0.5), (24, 4, 6, 1.25),
                                      (8, 2, 3, None)])
def test_sorted_equals_onehot(s, k, e, cf):
  rng = np.random.default_rng(s * k + e)
  expert = jnp.asarray(rng.integers(0, e, size=(s, k)))
  valid = jnp.asarray(rng.random((s, k)) < 0.8)
  c = capacity.capacity(s, e, k, cf)
  slot_ref, kept_ref = capacity.slots_onehot(expert, valid, e, c)
  slot, kept, source_ExC = capacity.slots_sorted(expert, valid, e, c)
  np.testing.assert_array_equal(kept, kept_ref)
  np.testing.assert_array_equal(jnp.where(kept, slot, -1), jnp.where(kept_ref, slot_ref, -1))
  # The slot -> assignment map is the inverse of the assignment -> slot map.
  for t in range(s):
    for j in range(k):
      if kept[t, j]:
        assert int(source_ExC[expert[t, j], slot[t, j]]) == j * s + t
  assert int(jnp.sum(source_ExC < s * k)) == int(jnp.sum(kept))


def test_capacity_formula_and_errors():
  assert capacity.capacity(1024, 8, 2, 1.25) == 320  # ceil(1.25 * 1024 * 2 / 8)
  assert capacity.capacity(10, 4, 1, 1.0) == 3       # ceil(2.5)
  assert capacity.capacity(10, 4, 1, None) == 10     # dropless: S slots
  with pytest.raises(ValueError, match=r'capacity_factor=0.*> 0'):
    capacity.capacity(10, 4, 1, 0)
  with pytest.raises(ValueError, match=r'capacity_factor=-1.0'):
    capacity.capacity(10, 4, 1, -1.0)
