"""From an experiment config to tasks, a pipeline and a model (the only code that reads the
config; layers take explicit arguments). Bad values are refused here, before compilation,
with the key, the value and what is allowed."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pathways import registry
from pathways.data import pipeline as pipeline_lib
from pathways.nn import grow as grow_lib
from pathways.nn import model as model_lib
from pathways.parallel import sharding as sharding_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _bad(key, value, allowed):
  raise ValueError(f'config.{key}={value!r}: {allowed}.')


def validate(config) -> None:
  """Checks the values the config's types cannot (unknown keys are refused by the flags)."""
  if not config.tasks:
    _bad('tasks', list(config.tasks), 'must name at least one task')
  if len(set(config.tasks)) != len(config.tasks):
    _bad('tasks', list(config.tasks), 'must not repeat a task')
  for name in config.tasks:
    registry.get_task(name)  # unknown names: the registry lists the known ones
  for name, value in config.get('task_connectivity', {}).items():
    if name not in config.tasks:
      _bad(f'task_connectivity.{name}', value, f'names a task not in config.tasks '
           f'{list(config.tasks)}')
  for section in ('task_loss_weights', 'task_flops_budgets', 'task_sampling_weights'):
    for name, value in config.get(section, {}).items():
      if name not in config.tasks:
        _bad(f'{section}.{name}', value, f'names a task not in config.tasks {list(config.tasks)}')
      if not value > 0:
        _bad(f'{section}.{name}', value, 'must be > 0')
  if config.data.batch_size < len(config.tasks):
    _bad('data.batch_size', config.data.batch_size,
         f'must be >= the number of tasks ({len(config.tasks)}): each task gets a slot')
  grown_from_config(config)
  if config.model.dtype not in DTYPES:
    _bad('model.dtype', config.model.dtype, f'must be one of {sorted(DTYPES)}')
  for key in ('learning_rate', 'clip_norm'):
    if not config.optim[key] > 0:
      _bad(f'optim.{key}', config.optim[key], 'must be > 0')
  for key in ('num_steps', 'log_every', 'eval_every', 'eval_batches'):
    if not config.train[key] >= 1:
      _bad(f'train.{key}', config.train[key], 'must be an int >= 1')
  for key in ('every', 'keep'):
    if not config.ckpt[key] >= 1:
      _bad(f'ckpt.{key}', config.ckpt[key], 'must be an int >= 1')
  for key, value in config.aux.items():
    if value < 0:
      _bad(f'aux.{key}', value, 'must be >= 0')
  sharding_lib.mesh_shape(config.mesh, jax.device_count())
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  for axis in sharding_lib.rule_axes(rules):
    if axis not in config.mesh and axis not in ('data', 'expert'):
      _bad('sharding_rules', list(config.sharding_rules), f'name mesh axis {axis!r}, not in '
           f'config.mesh {dict(config.mesh)} (absent standard axes data/expert replicate)')
  mesh = sharding_lib.make_mesh(config.mesh)
  if jax.process_count() > 1 and mesh.size != jax.device_count():
    _bad('mesh', dict(config.mesh), f'must use all {jax.device_count()} devices of the '
         f'{jax.process_count()} processes')
  split = sharding_lib.data_shards(mesh, rules)
  shards = config.data.shards
  if not (isinstance(shards, int) and shards >= 0) or (shards and shards % split):
    _bad('data.shards', shards, f'must be 0 (as the batch rule splits the mesh: {split}) or a '
         f'multiple of {split}')
  shards = shards or split
  if config.data.batch_size % shards or config.data.batch_size // shards < len(config.tasks):
    _bad('data.batch_size', config.data.batch_size, f'must split into {shards} equal blocks '
         f'(data.shards, or the devices the batch is split over) of at least '
         f'{len(config.tasks)} rows, one per task')


def upgrade(config):
  """A saved config.json from before the scale-out keys: mesh {'shape', 'axes'} becomes
  {axis: size}; missing sharding_rules and data.shards take their defaults."""
  if 'shape' in config.mesh and 'axes' in config.mesh:
    config.mesh = dict(zip(config.mesh.axes, config.mesh.shape))
  if 'sharding_rules' not in config:
    config.sharding_rules = [[k, list(v) if isinstance(v, tuple) else v]
                             for k, v in sharding_lib.DEFAULT_RULES[:2]]
  if 'shards' not in config.data:
    config.data.shards = 0
  return config


def tasks_from_config(config):
  tasks = []
  for name in config.tasks:
    t = registry.get_task(name)
    budget = config.task_flops_budgets.get(name)
    if budget is not None:
      t = dataclasses.replace(t, flops_budget=float(budget))
    weight = config.get('task_sampling_weights', {}).get(name)
    if weight is not None:
      t = dataclasses.replace(t, sampling_weight=float(weight))
    allowed = config.get('task_connectivity', {}).get(name)
    if allowed is not None:  # {'1': [0, 1]}: config keys are strings, layers are ints
      t = dataclasses.replace(t, connectivity={int(layer): tuple(int(e) for e in experts)
                                               for layer, experts in allowed.items()})
    tasks.append(t)
  return tasks


def pipeline_from_config(config, tasks, split='train', seed_offset=0, **kwargs):
  d = config.data
  return pipeline_lib.MultitaskPipeline(
      tasks, d.batch_size, split=split, seed=config.seed + seed_offset, mixture=d.mixture,
      temperature=d.temperature, data_dir=d.data_dir or None, **kwargs)


def model_from_config(config, tasks, layout, rngs: nnx.Rngs) -> model_lib.Figure1Model:
  m = config.model
  moe_kwargs = dict(m.moe)
  moe_kwargs['banks'] = [tuple(b) for b in moe_kwargs['banks']]
  if 'num_tasks' not in moe_kwargs:
    moe_kwargs['num_tasks'] = len(tasks)
  return model_lib.Figure1Model(
      tasks, layout, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
      mlp_hidden=m.mlp_hidden, moe_every=m.moe_every, moe_kwargs=moe_kwargs, patch=m.patch,
      halting=m.halting, remat=m.remat, grown=grown_from_config(config),
      dtype=DTYPES[m.dtype], rngs=rngs)


def grown_from_config(config) -> tuple[grow_lib.Grown, ...]:
  """The validated `config.model.grown` (components the architecture search added)."""
  m = config.model
  moe_layers = [l for l in range(m.num_layers) if m.moe_every and (l + 1) % m.moe_every == 0]
  return grow_lib.parse(m.get('grown', ()), list(config.tasks), m.num_layers, moe_layers)


def model_signature(config) -> dict:
  """What a checkpoint's shapes depend on: a workdir refuses a config that changes it."""
  return {'tasks': list(config.tasks), 'model': config.model.to_dict(),
          'batch_size': config.data.batch_size}
