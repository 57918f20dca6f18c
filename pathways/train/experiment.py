"""From an experiment config to one `Experiment`: tasks, layout, mesh, rules, graph and
shardings (the only code that reads the config; layers take explicit arguments).

`build(config)` parses the config once (comma lists split, old workdir configs upgraded),
imports the task plugin modules it names, validates it (bad values are refused before any
compilation, naming the key, the value and what is allowed) and returns the `Experiment`.
The train state is a `TrainState(model, opt)`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pathways import registry
from pathways.data import layout as layout_lib
from pathways.data import mixture as mixture_lib
from pathways.data import pipeline as pipeline_lib
from pathways.data import prefetch as prefetch_lib
from pathways.nn import adaptive
from pathways.nn import grouped_matmul as grouped_lib
from pathways.nn import grow as grow_lib
from pathways.nn import model as model_lib
from pathways.nn import router as router_lib
from pathways.parallel import sharding as sharding_lib
from pathways.train import freeze as freeze_lib
from pathways.train import optimizer as optimizer_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# config.aux: the router losses (weights; every router loss is reachable), the ponder cost
# weight and the budget multipliers' dual-ascent rate.
AUX_KEYS = router_lib.AUX_LOSSES + ('ponder_cost', 'ponder_kl', 'ponder_prior', 'ponder_warmup',
                                    'ponder_floor', 'budget_rate')
AUX_DEFAULTS = dict(ponder_kl=0.0, ponder_prior=0.2, ponder_warmup=0, ponder_floor=0.0)
# model keys added after configs were saved, with the values that reproduce those runs
MODEL_DEFAULTS = dict(exit_weights='', exit_confidence='softmax', mod_every=0, mod_capacity=0.5)
# Keys a user may give as one comma-separated string (--config.tasks=digits,parity).
COMMA_LISTS = ('tasks', 'task_modules')


class TrainState(NamedTuple):
  """What training updates: the model and its optimizer (checkpointed together)."""
  model: Any
  opt: Any


def _bad(key, value, allowed):
  raise ValueError(f'config.{key}={value!r}: {allowed}.')


def comma_list(value) -> list[str]:
  """['a', 'b'] from ['a', 'b'], ('a,b',) or 'a,b' (empty parts dropped)."""
  items = [value] if isinstance(value, str) else list(value or ())
  return [part.strip() for item in items for part in str(item).split(',') if part.strip()]


def upgrade(config):
  """A saved config.json from before today's keys, in today's form: mesh {'shape', 'axes'}
  -> {axis: size}; missing sharding_rules, data.shards, task_modules, aux weights take their
  defaults; the router's options (k, null experts, noise, top-p, route_on...) move into the
  `model.moe.router` dict."""
  if 'shape' in config.mesh and 'axes' in config.mesh:
    config.mesh = dict(zip(config.mesh.axes, config.mesh.shape))
  if 'sharding_rules' not in config:
    config.sharding_rules = [[k, list(v) if isinstance(v, tuple) else v]
                             for k, v in sharding_lib.DEFAULT_RULES[:2]]
  if 'shards' not in config.data:
    config.data.shards = 0
  if 'prefetch' not in config.data:
    config.data.prefetch = prefetch_lib.DEFAULT_DEPTH
  if 'task_modules' not in config:
    config.task_modules = []
  if 'aux' in config and 'importance_load_loss' not in config.aux:
    config.aux.importance_load_loss = 0.0
  for key, value in AUX_DEFAULTS.items():
    if 'aux' in config and key not in config.aux:
      config.aux[key] = value
  for key, value in MODEL_DEFAULTS.items():
    if 'model' in config and key not in config.model:
      config.model[key] = value
  if 'init_from' in config and 'upcycle_noise' not in config:
    config.upcycle_noise = 0.0
  if 'optim' in config and 'accumulate_steps' not in config.optim:
    config.optim.accumulate_steps = 1
  if 'train' in config and 'profile_steps' not in config.train:
    config.train.profile_steps = ()
  moe = config.get('model', {}).get('moe')
  if moe is not None and isinstance(moe.get('router', 'top_k'), str):
    spec = {'name': moe.get('router', 'top_k')}
    takes = router_lib.options_of(spec['name'])
    for key in ('k', 'num_null_experts', 'top_p', 'noisy', 'renormalize', 'route_on'):
      if key in moe:
        if key in takes:
          spec[key] = moe[key]
        del moe[key]
    moe.router = spec
  return config


def parse(config) -> ml_collections.ConfigDict:
  """A normalized copy of `config`: comma lists split, lists as lists, old keys upgraded,
  freeze presets expanded into the regexes they stand for (`pathways.train.freeze`; the
  recorded config holds the regexes, so a later evaluation needs no `init_from`)."""
  d = config.to_dict()
  for key in COMMA_LISTS:
    d[key] = comma_list(d.get(key, ()))
  freeze = d.get('freeze', ())
  d['freeze'] = [freeze] if isinstance(freeze, str) else list(freeze)
  config = upgrade(ml_collections.ConfigDict(d))
  if any(p in freeze_lib.PRESETS for p in config.freeze):
    config.freeze = freeze_lib.patterns(config)
  return config


def validate(config, mesh=None, rules=None) -> None:
  """Checks the values the config's types cannot (unknown keys are refused by the flags),
  the mesh and batch split among them (`mesh`, `rules`: the ones the run uses; default the
  config's)."""
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
  _validate_model(config.model)
  _validate_router(config.model.moe.router, config.model.moe.banks)
  if not _finite(config.get('upcycle_noise', 0.0), 0.0):
    _bad('upcycle_noise', config.upcycle_noise, 'must be a finite number >= 0')
  for i, pattern in enumerate(config.freeze):
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      _bad(f'freeze[{i}]', pattern, f'must be a regular expression ({e})')
  _validate_optim(config.optim)
  _validate_data(config.data)
  if not _int(config.seed, 0):
    _bad('seed', config.seed, 'must be an int >= 0')
  for key in ('num_steps', 'log_every', 'eval_every', 'eval_batches'):
    if not _int(config.train[key], 1):
      _bad(f'train.{key}', config.train[key], 'must be an int >= 1')
  if not _int(config.train.get('routing_batches', 0), 0):
    _bad('train.routing_batches', config.train.routing_batches, 'must be an int >= 0')
  profile = tuple(config.train.get('profile_steps', ()))
  if profile and not (len(profile) == 2 and all(_int(s, 1) for s in profile)
                      and profile[0] <= profile[1]):
    _bad('train.profile_steps', profile, 'must be () or (first, last) steps with 1 <= first '
         '<= last')
  for key in ('every', 'keep'):
    if not _int(config.ckpt[key], 1):
      _bad(f'ckpt.{key}', config.ckpt[key], 'must be an int >= 1')
  best = config.ckpt.get('best_metric', '')
  reported = ['eval/mean_accuracy'] + [f'eval/{t}/{m}' for t in config.tasks
                                       for m in ('accuracy', 'loss')]
  if best and best not in reported:
    _bad('ckpt.best_metric', best, f"must be '' (no best checkpoint) or a metric the "
         f'evaluation reports, e.g. {reported[:4]}')
  unknown = sorted(set(config.aux) - set(AUX_KEYS))
  if unknown:
    _bad('aux', dict(config.aux), f'{unknown} unknown; the keys are {list(AUX_KEYS)}')
  for key, value in config.aux.items():
    if not _finite(value, 0.0):
      _bad(f'aux.{key}', value, 'must be a finite number >= 0')
  if not 0.0 < config.aux.get('ponder_prior', 0.2) < 1.0:
    _bad('aux.ponder_prior', config.aux.ponder_prior, "must be in (0, 1): the truncated "
         "geometric prior's halting probability per layer")
  if not _int(config.aux.get('ponder_warmup', 0), 0):
    _bad('aux.ponder_warmup', config.aux.ponder_warmup, 'must be an int >= 0 (steps)')
  rules = rules or sharding_lib.rules_from_config(config.sharding_rules)
  allowed_axes = {'data', 'expert'} | sharding_lib.rule_axes(rules)
  for axis in config.mesh:
    if axis not in allowed_axes:
      _bad('mesh', dict(config.mesh), f'axis {axis!r} is used by no sharding rule; axes are '
           f"'data', 'expert' or one a rule in config.sharding_rules names")
  sharding_lib.mesh_shape(config.mesh, jax.device_count())
  for axis in sharding_lib.rule_axes(rules):
    if axis not in config.mesh and axis not in ('data', 'expert'):
      _bad('sharding_rules', list(config.sharding_rules), f'name mesh axis {axis!r}, not in '
           f'config.mesh {dict(config.mesh)} (absent standard axes data/expert replicate)')
  _validate_mesh(config, mesh or sharding_lib.make_mesh(config.mesh), rules)


def _int(value, least) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _finite(value, least, below=math.inf) -> bool:
  """A real number in [least, below) that float32 holds as a finite value."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and least <= value < below
          and math.isfinite(np.float32(value)))


def _validate_model(m) -> None:
  for key in ('d_model', 'num_layers', 'num_heads', 'mlp_hidden', 'patch'):
    if not _int(m[key], 1):
      _bad(f'model.{key}', m[key], 'must be an int >= 1')
  if m.d_model % m.num_heads:
    _bad('model.num_heads', m.num_heads, f'must divide model.d_model={m.d_model}')
  adaptive.exit_weights(m.get('exit_weights', ''), m.num_layers)  # names key and value
  if not _int(m.get('mod_every', 0), 0):
    _bad('model.mod_every', m.mod_every, 'must be an int >= 0 (0: no Mixture-of-Depths layer)')
  if not _finite(m.get('mod_capacity', 0.5), 1e-9, 1.0 + 1e-9):
    _bad('model.mod_capacity', m.mod_capacity, 'must be in (0, 1]: the share of token slots a '
         'Mixture-of-Depths block processes')
  if m.get('exit_confidence', 'softmax') not in adaptive.EXIT_CONFIDENCE:
    _bad('model.exit_confidence', m.exit_confidence, f'must be one of {adaptive.EXIT_CONFIDENCE}')
  if m.get('exit_confidence', 'softmax') == 'classifier' and not m.get('exit_weights', ''):
    _bad('model.exit_confidence', m.exit_confidence, "needs model.exit_weights (the classifier "
         "trains beside the exits)")
  if m.get('exit_weights', '') and m.halting:
    _bad('model.exit_weights', m.exit_weights, "must be '' with model.halting=True: exits "
         "(deep supervision + calibrated confidence) and PonderNet halting are alternatives")
  try:
    model_lib.remat_policy(m.remat)
  except ValueError:
    _bad('model.remat', m.remat, f'must be one of {tuple(model_lib.REMAT_POLICIES)} (or '
         f'True / False: \'full\' / \'\')')
  if not isinstance(m.get('pack', False), bool):
    _bad('model.pack', m.pack, 'must be True or False')
  if not isinstance(m.moe.get('remat_hidden', False), bool):
    _bad('model.moe.remat_hidden', m.moe.remat_hidden, 'must be True or False')
  grouped = m.moe.get('grouped_matmul', 'ragged_dot')
  if grouped not in grouped_lib.GROUPED_MATMULS:
    _bad('model.moe.grouped_matmul', grouped,
         f'must be one of {grouped_lib.GROUPED_MATMULS.names()}')
  if grouped != 'ragged_dot' and m.moe.get('dispatcher', 'sorted') != 'ragged':
    _bad('model.moe.grouped_matmul', grouped, "needs model.moe.dispatcher='ragged' (the "
         "dropless dispatcher runs the grouped matmul)")
  if not _int(m.moe_every, 0):
    _bad('model.moe_every', m.moe_every, 'must be an int >= 0 (0: no MoE layer)')
  banks = m.moe.banks
  if not banks or not all(len(b) == 2 and _int(b[0], 1) and _int(b[1], 1) for b in banks):
    _bad('model.moe.banks', [list(b) for b in banks or []], 'must be a non-empty list of '
         '[num_experts >= 1, hidden >= 1]')
  for key in ('capacity_factor', 'eval_capacity_factor'):
    value = m.moe.get(key)
    if value is not None and not _finite(value, 1e-9):
      _bad(f'model.moe.{key}', value, 'must be a finite number > 0, or None (dropless)')
  if not _int(m.moe.get('shared_experts', 0), 0):
    _bad('model.moe.shared_experts', m.moe.shared_experts, 'must be an int >= 0')
  if m.moe.get('shared_hidden') is not None and not _int(m.moe.shared_hidden, 1):
    _bad('model.moe.shared_hidden', m.moe.shared_hidden, 'must be an int >= 1, or None (the '
         'first bank\'s width)')
  granularity = m.moe.get('granularity', 1)
  if not _int(granularity, 1):
    _bad('model.moe.granularity', granularity, 'must be an int >= 1')
  if banks and any(b[1] % granularity for b in banks):
    _bad('model.moe.granularity', granularity, f'must divide every bank\'s hidden width; banks '
         f'are {[list(b) for b in banks]}')


def _validate_router(spec, banks) -> None:
  spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec
  try:
    name, options = router_lib.parse(spec)
    router_lib.ROUTERS.lookup(name)
  except ValueError as e:
    _bad('model.moe.router', spec, str(e))
  allowed = router_lib.options_of(name)
  bad = sorted(set(options) - set(allowed))
  if bad:
    _bad('model.moe.router', spec, f'{name!r} takes no option {bad}; its options are {allowed}')
  full = router_lib.resolved(spec)
  experts = sum(b[0] for b in banks)
  choices = experts + full.get('num_null_experts', 0)
  if 'k' not in full:  # routers without a per-token k (Soft MoE)
    return
  if not router_lib.ROUTERS.lookup(name).fixed_capacity and not (
      _int(full['k'], 1) and full['k'] <= choices):
    _bad('model.moe.router.k', full['k'], f'must be an int with 1 <= k <= experts + null '
         f'experts = {experts} + {full.get("num_null_experts", 0)} = {choices}')
  if not _int(full['k'], 1):
    _bad('model.moe.router.k', full['k'], 'must be an int >= 1')
  if full.get('route_on') not in router_lib.ROUTE_ON:
    _bad('model.moe.router.route_on', full.get('route_on'), f'must be one of '
         f'{router_lib.ROUTE_ON}')


def _validate_optim(o) -> None:
  if not _finite(o.learning_rate, 1e-30, 1e3):
    _bad('optim.learning_rate', o.learning_rate, 'must be > 0, finite and below 1000')
  if not _finite(o.clip_norm, 1e-30):
    _bad('optim.clip_norm', o.clip_norm, 'must be > 0 and finite')
  if not _int(o.warmup_steps, 0):
    _bad('optim.warmup_steps', o.warmup_steps, 'must be an int >= 0')
  if not _int(o.get('accumulate_steps', 1), 1):
    _bad('optim.accumulate_steps', o.accumulate_steps, 'must be an int >= 1')
  if not _finite(o.weight_decay, 0.0):
    _bad('optim.weight_decay', o.weight_decay, 'must be a finite number >= 0')
  for key in ('b1', 'b2'):
    if not _finite(o[key], 0.0, 1.0):
      _bad(f'optim.{key}', o[key], 'must be a number in [0, 1)')


def _validate_data(d) -> None:
  if d.mixture not in mixture_lib.SCHEMES:
    _bad('data.mixture', d.mixture, f'must be one of {mixture_lib.SCHEMES}')
  if not _finite(d.temperature, 1e-9):
    _bad('data.temperature', d.temperature, 'must be a finite number > 0')
  if not _int(d.get('prefetch', prefetch_lib.DEFAULT_DEPTH), 0):
    _bad('data.prefetch', d.prefetch, 'must be an int >= 0 (batches built ahead; 0: none)')


def _validate_mesh(config, mesh, rules) -> None:
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


def data_kwargs(config, mesh, rules) -> dict:
  """How this process's pipelines split the global batch (see `pipeline`)."""
  shards = config.data.shards or sharding_lib.data_shards(mesh, rules)
  return dict(num_shards=shards, process_index=jax.process_index(),
              process_count=jax.process_count())


def pipeline_from_config(config, tasks, split='train', seed_offset=0, **kwargs):
  d = config.data
  return pipeline_lib.MultitaskPipeline(
      tasks, d.batch_size, split=split, seed=config.seed + seed_offset, mixture=d.mixture,
      temperature=d.temperature, data_dir=d.data_dir or None, **kwargs)


def model_from_config(config, tasks, layout, rngs: nnx.Rngs) -> model_lib.Figure1Model:
  m = config.model
  moe_kwargs = dict(m.moe)
  moe_kwargs['banks'] = [tuple(b) for b in moe_kwargs['banks']]
  router = moe_kwargs['router']
  moe_kwargs['router'] = router.to_dict() if hasattr(router, 'to_dict') else dict(router)
  moe_kwargs.setdefault('num_tasks', len(tasks))
  moe_kwargs['loss_weights'] = {k: float(config.aux[k]) for k in router_lib.AUX_LOSSES}
  return model_lib.Figure1Model(
      tasks, layout, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
      mlp_hidden=m.mlp_hidden, moe_every=m.moe_every, moe_kwargs=moe_kwargs, patch=m.patch,
      halting=m.halting, exit_weights=adaptive.exit_weights(m.get('exit_weights', ''),
                                                            m.num_layers),
      exit_confidence=m.get('exit_confidence', 'softmax'), mod_every=m.get('mod_every', 0),
      mod_capacity=m.get('mod_capacity', 0.5),
      remat=m.remat, grown=grown_from_config(config), pack=m.get('pack', False),
      dtype=DTYPES[m.dtype], rngs=rngs)


def grown_from_config(config) -> tuple[grow_lib.Grown, ...]:
  """The validated `config.model.grown` (components the architecture search added)."""
  m = config.model
  moe_layers = [l for l in range(m.num_layers) if m.moe_every and (l + 1) % m.moe_every == 0]
  return grow_lib.parse(m.get('grown', ()), list(config.tasks), m.num_layers, moe_layers)


def model_signature(config) -> dict:
  """What a checkpoint's shapes depend on: a workdir refuses a config that changes it. The
  router spec counts with its defaults filled in (an option left out equals its default);
  rematerialization (`model.remat`, `model.moe.remat_hidden`), packing (`model.pack`) and the
  grouped-matmul implementation (`model.moe.grouped_matmul`) are left out: they change how the
  step computes, not the parameters."""
  model = config.model.to_dict()
  model.pop('remat', None)
  model.pop('pack', None)
  model['moe'].pop('remat_hidden', None)
  model['moe'].pop('grouped_matmul', None)
  model['moe']['router'] = router_lib.resolved(model['moe']['router'])
  return {'tasks': comma_list(config.tasks), 'model': model}


@dataclasses.dataclass
class Experiment:
  """One parsed, validated experiment.

  Attributes:
    config: the parsed config (lists as lists; what config.json holds).
    tasks: the tasks in the config's order (ids are positions).
    mesh, rules: the device mesh and logical-axis rules.
    data: how this process's pipelines split the global batch (`pipeline` kwargs).
    layout: the static batch layout.
    pipeline: the training pipeline (None when built from a given layout).
    graphdef, abstract_state, shardings: of the `TrainState` (shapes only, nothing
      allocated) and the sharding of every leaf.
    model_graphdef: the model's own graph (evaluation and analysis run the model alone on
      `state['model']`).
  """
  config: ml_collections.ConfigDict
  tasks: list
  mesh: Any
  rules: tuple
  data: dict
  layout: layout_lib.BatchLayout
  pipeline: Any
  graphdef: Any
  abstract_state: Any
  shardings: Any
  model_graphdef: Any
  _make: Callable = dataclasses.field(repr=False)

  @property
  def task_ids(self) -> dict[str, int]:
    return {t.name: i for i, t in enumerate(self.tasks)}

  @property
  def batch_sharding(self):
    return sharding_lib.batch_sharding(self.mesh, self.rules)

  def init_state(self):
    """The initial train state, created already sharded."""
    return jax.jit(lambda: nnx.state(self._make()), out_shardings=self.shardings)()

  def eval_pipeline(self):
    """A fresh evaluation pipeline (the same batches every time)."""
    return pipeline_from_config(self.config, self.tasks, split='eval', seed_offset=1,
                                **self.data)

  def put(self, batch):
    """A host batch (this process's blocks) onto the mesh."""
    return sharding_lib.put_batch(batch, self.batch_sharding)

  def model(self, state):
    """The model of a train state."""
    return nnx.merge(self.model_graphdef, state['model'])


def build(config, *, mesh=None, layout: layout_lib.BatchLayout | None = None) -> Experiment:
  """Parses, validates and builds an experiment. `mesh` replaces the config's; `layout`
  (e.g. an abstract one for ahead-of-time compilation) skips building the training data."""
  config = parse(config)
  registry.import_task_modules(config.task_modules)
  mesh = mesh or sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  validate(config, mesh, rules)
  tasks = tasks_from_config(config)
  data = data_kwargs(config, mesh, rules)
  pipeline = None
  if layout is None:
    pipeline = pipeline_from_config(config, tasks, **data)
    layout = pipeline.layout
  o = config.optim
  tx = optimizer_lib.make_optimizer(
      learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
      num_steps=config.train.num_steps, weight_decay=o.weight_decay, clip_norm=o.clip_norm,
      b1=o.b1, b2=o.b2, freeze=list(config.freeze), accumulate=o.get('accumulate_steps', 1))

  def make():
    model = model_from_config(config, tasks, layout,
                              nnx.Rngs(params=config.seed, router=config.seed + 1))
    return TrainState(model, nnx.Optimizer(model, tx, wrt=nnx.Param))

  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  return Experiment(config=config, tasks=tasks, mesh=mesh, rules=rules, data=data,
                    layout=layout, pipeline=pipeline, graphdef=graphdef, abstract_state=state,
                    shardings=sharding_lib.state_shardings(state, mesh, rules),
                    model_graphdef=nnx.graphdef(abstract.model), _make=make)

