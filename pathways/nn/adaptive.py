"""Adaptive computation's small pure functions: exit loss weights (deep supervision), exit
confidence, and PonderNet's prior.

* Deep supervision (Lee et al. 2015; the exits of DeeBERT / CALM): every layer's state goes
  through the final norm and the task's own head, and the loss is sum_l w_l CE_l.
* Confidence exits at inference (CALM, Schuster et al. 2022): a pooled example stops at the
  first layer whose softmax maximum reaches its task's threshold; a per-position token stops
  the same way, and its state is copied to the layers it skips, so later tokens' attention
  reads keys and values computed from the copied state (CALM's state propagation).
  The confidence is the softmax maximum (2 D C FLOPs per check: a third of a layer for a
  256-byte vocabulary at D=64) or CALM's learned exit classifier (2 D FLOPs per check).
* PonderNet (Banino et al. 2021, eq. 6): KL(p || truncated geometric(lambda_p)) regularizes
  the halting distribution p over layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EXIT_WEIGHTS = ('equal', 'linear')
EXIT_CONFIDENCE = ('softmax', 'classifier')


def exit_weights(spec, num_layers: int) -> tuple[float, ...] | None:
  """Loss weight of every layer's exit, summing to 1; None for '' (no deep supervision).

  `spec`: '' (off), 'equal' (1/L each), 'linear' (w_l proportional to l + 1: deeper exits
  weigh more) or a list of `num_layers` numbers >= 0 with a positive sum."""
  if spec in ('', None):
    return None
  if isinstance(spec, str):
    if spec not in EXIT_WEIGHTS:
      raise ValueError(f'model.exit_weights={spec!r}: must be \'\' (off), one of '
                       f'{EXIT_WEIGHTS} or a list of {num_layers} numbers >= 0.')
    w = np.ones(num_layers) if spec == 'equal' else np.arange(1.0, num_layers + 1)
  else:
    w = np.asarray(list(spec), np.float64)
    if w.shape != (num_layers,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f'model.exit_weights={list(spec)!r}: must be \'\' (off), one of '
                       f'{EXIT_WEIGHTS} or a list of {num_layers} numbers >= 0 (one per layer) '
                       f'with a positive sum.')
  return tuple(float(v) for v in w / w.sum())


def confidence(logits):
  """CALM's softmax response: the largest class probability, over the last axis."""
  return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def geometric_prior(lambda_p: float, num_layers: int):
  """The truncated geometric prior p_G(l) = lambda_p (1 - lambda_p)^l over l = 0..L-1,
  renormalized to sum to 1 (PonderNet truncates at the maximum number of steps)."""
  p = lambda_p * (1.0 - lambda_p) ** np.arange(num_layers)
  return jnp.asarray(p / p.sum(), jnp.float32)


def ponder_kl(p_LxB, lambda_p: float, weight_B):
  """Mean over the weighted examples of KL(p || truncated geometric(lambda_p)) [PonderNet eq. 6]."""
  prior_L = geometric_prior(lambda_p, p_LxB.shape[0])[:, None]
  p = jnp.clip(p_LxB, 1e-12, 1.0)
  kl_B = jnp.sum(p * (jnp.log(p) - jnp.log(prior_L)), axis=0)
  w = weight_B.astype(jnp.float32)
  return jnp.sum(kl_B * w) / jnp.maximum(jnp.sum(w), 1.0)
