"""The Task interface: what a task plugin states about itself.

A task names its data (a TFDS builder or any random-access data source, and its splits),
its modality (which stem embeds it), its head (pooled classification or per-position
prediction, and the number of classes or the vocabulary size), its loss and metrics, and
optionally connectivity (the experts it may use per MoE layer), a sampling weight, a compute
budget (FLOPs per example) and a per-example difficulty feature for analysis.

Tasks are plain data: the model and the data pipeline read them; they hold no parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from pathways import heads as heads_lib
from pathways import losses as losses_lib
from pathways import modalities as modalities_lib
from pathways import registry


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the multitask model.

  Attributes:
    name: unique task name; per-task parameters are keyed by it.
    modality: a registered modality (`pathways.modalities`): 'image' (uint8 [H, W] or
      [H, W, C]), 'bytes' (int [L] tokens) or 'vector' (float [D_in]); the stem of that
      modality embeds the inputs.
    head: a registered head (`pathways.heads`): 'classify' (one label per example, pooled)
      or 'per_position' (one target per position, causal attention: language modelling).
    num_classes: classes of a 'classify' head, vocabulary of a 'per_position' head.
    data: a callable (split, data_dir) -> random-access source (len() and [i] giving dicts
      of numpy arrays), usually `tfds.data_source` over this task's TFDS builder.
    splits: role -> split name, with at least 'train' and 'eval'; optionally 'calibration'
      (held-out examples that exit thresholds are calibrated on, `tools/calibrate_exits.py`).
    input_feature, target_feature: feature names in the examples.
    input_shape, input_dtype: shape and dtype of one example's input (checked before any
      compilation).
    is_prepared: optional callable (data_dir) -> bool, for listings.
    loss: a registered loss (`pathways.losses.LOSSES`), used by training and evaluation.
    metrics: registered metrics (`pathways.losses.METRICS`) the evaluation reports for the
      task, e.g. ('accuracy', 'loss', 'perplexity'); loss and accuracy are always reported.
    connectivity: optional {moe_layer_index: allowed expert ids}; default everything.
    sampling_weight: relative weight in the training mixture (> 0).
    flops_budget: optional target FLOPs per example.
    difficulty_feature: optional feature holding a per-example difficulty (int or float).
    description: one line for listings.
  """
  name: str
  modality: str
  head: str
  num_classes: int
  data: Callable[[str, str | None], Any]
  splits: Mapping[str, str]
  input_feature: str
  target_feature: str
  input_shape: tuple[int, ...]
  input_dtype: str
  is_prepared: Callable[[str | None], bool] | None = None
  loss: str = 'cross_entropy'
  metrics: tuple[str, ...] = ('accuracy', 'loss')
  connectivity: Mapping[int, tuple[int, ...]] | None = None
  sampling_weight: float = 1.0
  flops_budget: float | None = None
  difficulty_feature: str | None = None
  description: str = ''

  def __post_init__(self):
    def bad(field, value, allowed):
      raise ValueError(f'task {self.name!r}: {field}={value!r}: {allowed}.')

    if not isinstance(self.name, str) or not self.name:
      bad('name', self.name, 'must be a non-empty string')
    if self.modality not in modalities_lib.MODALITIES:
      bad('modality', self.modality, f'must be one of {tuple(modalities_lib.in_order())}')
    if self.head not in heads_lib.HEADS:
      bad('head', self.head, f'must be one of {heads_lib.HEADS.names()}')
    readable = heads_lib.get(self.head).modalities
    if readable is not None and self.modality not in readable:
      bad('head', self.head, f'{heads_lib.get(self.head).description} needs modality '
          f'{" or ".join(repr(m) for m in readable)}')
    if not isinstance(self.num_classes, int) or self.num_classes < 2:
      bad('num_classes', self.num_classes, 'must be an int >= 2')
    shape = self.input_shape
    if not isinstance(shape, (tuple, list)) or not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
      bad('input_shape', shape, 'must be a non-empty tuple of ints >= 1')
    try:
      np.dtype(self.input_dtype)
    except TypeError:
      bad('input_dtype', self.input_dtype, "must be a numpy dtype name, e.g. 'uint8', 'int32', "
          "'float32'")
    if not callable(self.data):
      bad('data', self.data, 'must be a callable (split, data_dir) -> data source')
    for role in ('train', 'eval'):
      if role not in self.splits:
        bad('splits', dict(self.splits), f"must name a {role!r} split")
    if self.loss not in losses_lib.LOSSES:
      bad('loss', self.loss, f'must be one of {losses_lib.LOSSES.names()}')
    for m in self.metrics:
      if m not in losses_lib.METRICS:
        bad('metrics', self.metrics, f'each must be one of {losses_lib.METRICS.names()}')
    if not self.sampling_weight > 0:
      bad('sampling_weight', self.sampling_weight, 'must be > 0')
    if self.flops_budget is not None and not self.flops_budget > 0:
      bad('flops_budget', self.flops_budget, 'must be > 0 or None')
    for layer, experts in (self.connectivity or {}).items():
      if not experts:
        bad('connectivity', dict(self.connectivity),
            f'layer {layer} leaves the task no expert')


registry.TASKS.entry_type = Task  # register_task accepts Task objects (or factories of them)
