"""Auxiliary losses against hand-computed values (the arithmetic is in the comments)."""
import jax.numpy as jnp
import numpy as np
import pytest

from pathways.nn import aux_losses


def test_load_balance_loss_hand_computed():
  # T=2, E=2. probs: [[0.8, 0.2], [0.6, 0.4]] -> P = [0.7, 0.3].
  # counts = [2, 0] -> f = [1, 0]. loss = E * sum f*P = 2 * (1*0.7 + 0*0.3) = 1.4
  probs = jnp.array([[0.8, 0.2], [0.6, 0.4]])
  assert float(aux_losses.load_balance_loss(probs, jnp.array([2, 0]))) == pytest.approx(1.4)
  # Balanced: counts [1, 1] -> f = [0.5, 0.5]; loss = 2 * (0.35 + 0.15) = 1.0
  assert float(aux_losses.load_balance_loss(probs, jnp.array([1, 1]))) == pytest.approx(1.0)
  # Masking the second token: P = [0.8, 0.2]; counts [1, 0]: loss = 2 * 0.8 = 1.6
  active = jnp.array([True, False])
  assert float(aux_losses.load_balance_loss(probs, jnp.array([1, 0]), active)) == pytest.approx(1.6)


def test_cv_squared_and_importance_load_hand_computed():
  # v = [1, 3]: mean 2, population variance ((1-2)^2 + (3-2)^2) / 2 = 1 -> CV^2 = 1/4
  assert float(aux_losses.cv_squared(jnp.array([1.0, 3.0]))) == pytest.approx(0.25)
  # importance [1, 3] -> 0.25; load [2, 2] -> 0; total 0.25
  loss = aux_losses.importance_load_loss(jnp.array([1.0, 3.0]), jnp.array([2.0, 2.0]))
  assert float(loss) == pytest.approx(0.25)


def test_router_z_loss_hand_computed():
  # logits [[0, 0], [ln 3, 0]]: logsumexp = ln 2 and ln 4 = 2 ln 2.
  # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 ln2^2 = 1.2011325...
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
  assert float(aux_losses.router_z_loss(logits)) == pytest.approx(2.5 * np.log(2) ** 2, rel=1e-6)
  # Only the first token active: ln2^2
  assert float(aux_losses.router_z_loss(logits, jnp.array([True, False]))) == pytest.approx(
      np.log(2) ** 2, rel=1e-6)


def test_router_entropy_hand_computed():
  # uniform over 4: ln 4; one-hot: 0 -> mean ln4 / 2
  probs = jnp.array([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
  assert float(aux_losses.router_entropy(probs)) == pytest.approx(np.log(4) / 2, rel=1e-6)


def test_noisy_load_hand_computed():
  # One token, E=3, k=1. noisy logits [2, 1, 0], clean [1, 1, 1], noise std 1.
  # Expert 0 is in the top 1: threshold = 2nd largest noisy = 1 -> Phi(1 - 1) = 0.5
  # Experts 1 and 2 are out: threshold = largest noisy = 2 -> Phi(1 - 2) = Phi(-1) = 0.158655
  load = aux_losses.noisy_load(jnp.array([[1.0, 1.0, 1.0]]), jnp.array([[2.0, 1.0, 0.0]]),
                               jnp.ones((1, 3)), k=1)
  np.testing.assert_allclose(load, [0.5, 0.15865525, 0.15865525], rtol=1e-5)
