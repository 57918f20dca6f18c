"""Task losses and evaluation metrics as registries (`Task.loss`, `Task.metrics`).

LOSSES: name -> fn(logits, labels) giving the loss per example (or per position; labels
< 0 give 0, masked by the caller). METRICS: name -> fn(mean loss, mean accuracy) giving
what the evaluation reports as `eval/<task>/<name>`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pathways import registry

LOSSES = registry.Registry('loss')
METRICS = registry.Registry('metric')


@LOSSES.register('cross_entropy')
def cross_entropy(logits, labels):
  """-log softmax(logits)[label] per example (or per position); labels < 0 give 0."""
  picked = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[..., None], -1)
  return -picked[..., 0]


METRICS.add('loss', lambda loss, accuracy: loss)
METRICS.add('accuracy', lambda loss, accuracy: accuracy)
# Per-token cross-entropy in nats -> perplexity, and -> bits per byte for byte-level models.
METRICS.add('perplexity', lambda loss, accuracy: math.exp(min(loss, 700.0)))
METRICS.add('bits_per_byte', lambda loss, accuracy: loss / math.log(2.0))
