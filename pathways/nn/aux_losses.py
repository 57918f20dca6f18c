"""Auxiliary router losses: small pure functions, each with the paper's equation.

All take float32 router quantities over T tokens and E real experts, with an optional
`active_T` mask (padding and halted tokens do not count). Each returns a scalar.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp


def _weights(active_T, num_tokens):
  if active_T is None:
    return jnp.ones((num_tokens,), jnp.float32)
  return active_T.astype(jnp.float32)


def load_balance_loss(probs_TxE, count_E, active_T=None):
  """Switch Transformer load balance (Fedus et al. 2021, eq. 4-6; GShard's l_aux).

  loss = E * sum_e f_e * P_e, with f_e = count_e / sum(count) the fraction of assignments
  sent to expert e and P_e the mean router probability of e over active tokens. Equals 1
  under perfect balance, E when every token goes to one expert with probability 1.

  Args:
    probs_TxE: router softmax over real experts.
    count_E: assignments per expert (top-k choices before capacity, or expert-choice picks).
    active_T: optional bool mask of tokens that count towards P.
  """
  w_T = _weights(active_T, probs_TxE.shape[0])
  num_experts = probs_TxE.shape[-1]
  count_E = count_E.astype(jnp.float32)
  f_E = count_E / jnp.maximum(jnp.sum(count_E), 1e-9)
  p_E = jnp.sum(probs_TxE * w_T[:, None], axis=0) / jnp.maximum(jnp.sum(w_T), 1.0)
  return num_experts * jnp.sum(f_E * p_E)


def cv_squared(v_E):
  """Squared coefficient of variation var(v) / mean(v)^2 (population variance)."""
  v_E = v_E.astype(jnp.float32)
  mean = jnp.mean(v_E)
  return jnp.var(v_E) / (mean**2 + 1e-10)


def importance_load_loss(importance_E, load_E):
  """Shazeer et al. 2017 (Sec. 4 and App. A): CV(Importance)^2 + CV(Load)^2.

  Importance(X)_e = sum_x G(x)_e, the summed gate values (eq. 6-7). Load(X)_e is the
  number of tokens routed to e, or its smooth estimator under noisy gating (eq. 8-10, see
  `noisy_load`). The paper weights the two terms separately; here they share one weight.
  """
  return cv_squared(importance_E) + cv_squared(load_E)


def noisy_load(clean_logits_TxE, noisy_logits_TxE, noise_std_TxE, k, active_T=None):
  """Smooth load estimator of noisy top-k gating (Shazeer et al. 2017, App. A, eq. 8-10).

  P(x, e) = Phi((clean_e - kth_excluding(noisy, k, e)) / noise_std_e), where the threshold
  is the k-th largest noisy logit among the other experts: the (k+1)-th largest overall if e
  is currently in the top k, else the k-th largest. Load_e = sum_x P(x, e).
  """
  top_TxK1 = jax.lax.top_k(noisy_logits_TxE, k + 1)[0]
  kth_in = top_TxK1[:, k][:, None]      # threshold for an expert inside the top k
  kth_out = top_TxK1[:, k - 1][:, None]  # threshold for an expert outside it
  is_in = noisy_logits_TxE >= kth_out
  threshold = jnp.where(is_in, kth_in, kth_out)
  prob_TxE = jax.scipy.stats.norm.cdf((clean_logits_TxE - threshold) / noise_std_TxE)
  w_T = _weights(active_T, clean_logits_TxE.shape[0])
  return jnp.sum(prob_TxE * w_T[:, None], axis=0)


def router_z_loss(logits_TxE, active_T=None):
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean_x (logsumexp_e logits(x)_e)^2."""
  w_T = _weights(active_T, logits_TxE.shape[0])
  z_T = logsumexp(logits_TxE, axis=-1)
  return jnp.sum(w_T * z_T**2) / jnp.maximum(jnp.sum(w_T), 1.0)


def router_entropy(probs_TxE, active_T=None):
  """Mean entropy (nats) of the router distribution over active tokens."""
  w_T = _weights(active_T, probs_TxE.shape[0])
  ent_T = -jnp.sum(probs_TxE * jnp.log(jnp.maximum(probs_TxE, 1e-30)), axis=-1)
  return jnp.sum(w_T * ent_T) / jnp.maximum(jnp.sum(w_T), 1.0)
