"""The train loop: `train_and_evaluate(config, workdir)`.

Order of things: `experiment.build` (parse and validate the config once, derive shardings
from an abstract `TrainState`) -> initialize already sharded -> resume (workdir
checkpoint > config.init_from > scratch) -> steps: `train_step(state, batch) -> (state,
scalars)` jitted with explicit shardings and donated state; the next step is dispatched
before the last one's scalars are read; non-finite scalars stop the run naming the metric
and step (the last checkpoint stays the last good one) -> metrics every `log_every`
steps, evaluation every `eval_every`, checkpoints every `ckpt.every` (async) -> SIGTERM or
Ctrl-C: save, wait, exit cleanly.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathways.analysis import collect as collect_lib
from pathways.analysis import report as report_lib
from pathways.analysis import summary as summary_lib
from pathways.data import prefetch as prefetch_lib
from pathways.nn import adaptive
from pathways.nn import budget as budget_lib
from pathways.nn import grow as grow_lib
from pathways.nn import model as model_lib
from pathways.parallel import sharding as sharding_lib
from pathways.train import checkpoint as checkpoint_lib
from pathways.train import evaluation
from pathways.train import experiment
from pathways.train import freeze as freeze_lib
from pathways.train import metric_writer
from pathways.train import optimizer as optimizer_lib
from pathways.train import peak as peak_lib
from pathways.train import signals
from pathways.train import workdir as workdir_lib


def make_train_step(exp: experiment.Experiment):
  """train_step(state, batch) -> (state, scalars) over `TrainState` states.

  The loss: sum_task weight * task loss + the routers' weighted auxiliary loss
  (`ModelOutput.aux_loss`) + the halting terms (aux.ponder_cost * expected depth + aux.ponder_kl
  * KL(p || truncated geometric(aux.ponder_prior)), both from step aux.ponder_warmup on) + the
  budget term. Scalars: the
  loss, gradient norm, FLOPs per example, per-task train loss and accuracy, every scalar
  routing metric (mean over MoE layers), mean depth, budgets."""
  config = exp.config
  weights = {name: float(config.task_loss_weights.get(name, 1.0)) for name in config.tasks}
  ponder_weight, budget_rate = config.aux.ponder_cost, config.aux.budget_rate
  aux = dict(experiment.AUX_DEFAULTS, **config.aux)
  graphdef = exp.graphdef
  accumulate = config.optim.get('accumulate_steps', 1)
  # auxiliary-loss-free balancing moves routing: never in a layer whose router is frozen
  m = config.model
  balanced = [l for l in range(m.num_layers) if m.moe_every and (l + 1) % m.moe_every == 0
              and not freeze_lib.is_frozen(f'blocks/{l}/ffn/router/w_DxE', config.freeze)]
  lr = optimizer_lib.schedule(learning_rate=config.optim.learning_rate,
                              warmup_steps=config.optim.warmup_steps,
                              num_steps=config.train.num_steps // accumulate)

  def train_step(state, batch):
    model, opt = nnx.merge(graphdef, state)

    def loss_fn(model):
      out = model(batch, deterministic=False)
      losses, accuracy = model_lib.task_losses(model, out, batch,
                                               halting_floor=aux['ponder_floor'])
      total = sum(weights[n] * losses[n] for n in losses) + out.aux_loss
      if out.ponder_cost is not None:
        on = (opt.step[...] >= aux['ponder_warmup']).astype(jnp.float32)
        ponder = ponder_weight * out.ponder_cost
        if aux['ponder_kl']:
          pooled = jnp.asarray(np.array(model.pooled))[jnp.asarray(batch['task_id'])]
          ponder = ponder + aux['ponder_kl'] * adaptive.ponder_kl(
              out.halting.p_LxB, aux['ponder_prior'], pooled * jnp.asarray(batch['weight']))
        total = total + on * ponder
      total = total + out.budget_loss
      if out.exits is not None and out.exits.classifier_loss is not None:
        total = total + out.exits.classifier_loss  # on stopped states: moves no model weight
      return total, (losses, accuracy, out)

    (loss, (losses, accuracy, out)), grads = nnx.value_and_grad(
        loss_fn, has_aux=True)(model)
    learning_rate = lr(opt.step[...] // accumulate)  # the rate of this step's update
    opt.update(model, grads)
    budget_lib.update_multipliers(model, out.budget, budget_rate)
    model.update_balance(out, balanced)  # auxiliary-loss-free balancing: outside the optimizer
    real = jnp.asarray(batch['weight']) > 0
    scalars = {'loss': loss, 'grad_norm': _global_norm(grads), 'learning_rate': learning_rate,
               'flops_per_example': jnp.mean(out.flops_per_example),
               # the model's own count of this step's FLOPs: real examples, forward x 3
               'model_flops': 3.0 * jnp.sum(out.flops_per_example * real),
               'examples': jnp.sum(real), 'tokens': jnp.sum(out.tokens_per_example * real)}
    for name in losses:
      scalars[f'train/{name}/loss'] = losses[name]
      scalars[f'train/{name}/accuracy'] = accuracy[name]
    scalars.update(out.routing_scalars())
    if out.ponder_cost is not None:
      scalars['mean_depth'] = out.ponder_cost
    scalars.update({k: v for k, v in out.budget.items() if k.startswith('budget/')})
    return nnx.state(experiment.TrainState(model, opt)), scalars

  return train_step


def jit_train_step(exp: experiment.Experiment):
  """The train step jitted with the experiment's shardings, the state donated."""
  return jax.jit(make_train_step(exp), in_shardings=(exp.shardings, exp.batch_sharding),
                 out_shardings=(exp.shardings, sharding_lib.replicated(exp.mesh)),
                 donate_argnums=0)


def _global_norm(grads):
  leaves = [jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.sqrt(sum(leaves))


class _Meter:
  """Interval means of the step scalars and training-only rates.

  Rows logged every `every` steps hold each scalar's mean over the steps since the last row
  (not one step's value), the learning rate, and steps/s, examples/s and tokens/s (real
  examples and tokens, not padding), model FLOP/s (the model's own count of real examples'
  forward FLOPs x 3) and MFU against `peak_flops`, and the share of the time spent waiting
  for batches, over training steps only: the first step (compilation) and the time inside
  `pause()` (evaluation) do not count, so the ETA is right from the first row. A progress
  bar on a terminal; plain lines otherwise.
  """

  def __init__(self, start, total, every, peak_flops=None):
    self.every, self.total = every, total
    self.peak_flops = peak_flops  # all devices' peak FLOP/s: MFU = model FLOP/s / this
    self.timing = False  # the first step after a (re)start compiles
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, unit='step', dynamic_ncols=True)
    self._reset(time.time())
    self.rate = None

  def _reset(self, now):
    self.sums, self.n = {}, 0
    self.timed = {'steps': 0, 'examples': 0.0, 'tokens': 0.0, 'model_flops': 0.0,
                  'data_wait_s': 0.0}
    self.clock, self.paused = now, 0.0

  @contextlib.contextmanager
  def pause(self):
    t0 = time.time()
    try:
      yield
    finally:
      self.paused += time.time() - t0

  def add(self, step, scalars) -> dict | None:
    """Takes one step's host scalars; returns the row to log at a logging step, else None."""
    now = time.time()
    for key, value in scalars.items():
      if np.size(value) == 1 and key != 'data_wait_began':
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
    self.n += 1
    if self.timing:
      self.timed['steps'] += 1
      self.timed['examples'] += float(scalars.get('examples', 0.0))
      self.timed['tokens'] += float(scalars.get('tokens', 0.0))
      self.timed['model_flops'] += float(scalars.get('model_flops', 0.0))
      # a batch fetched before the timed interval began (the host reads a step's scalars
      # after fetching the next batch) waited outside it
      if float(scalars.get('data_wait_began', 0.0)) >= self.clock:
        self.timed['data_wait_s'] += float(scalars.get('data_wait_s', 0.0))
    else:  # this step compiled: time from its end
      self.timing, self.clock, self.paused = True, now, 0.0
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(loss=f"{float(scalars['loss']):.4f}")
    if step % self.every and step != self.total:
      return None
    row = {k: v / self.n for k, v in self.sums.items()}
    elapsed = now - self.clock - self.paused
    if self.timed['steps'] and elapsed > 0:
      self.rate = self.timed['steps'] / elapsed
      row.update(steps_per_s=self.rate, examples_per_s=self.timed['examples'] / elapsed,
                 tokens_per_s=self.timed['tokens'] / elapsed,
                 model_flops_per_s=self.timed['model_flops'] / elapsed,
                 # the share of the wall time the loop spent waiting for the next batch
                 data_wait_fraction=self.timed['data_wait_s'] / elapsed)
      if self.peak_flops:
        row['mfu'] = row['model_flops_per_s'] / self.peak_flops
    if self.bar is None:
      eta = (f'ETA {(self.total - step) / self.rate / 60:.1f} min' if self.rate else
             'ETA after the next interval')
      rate = f'{self.rate:.2f} steps/s' if self.rate else 'compiling'
      print(f"step {step}/{self.total}  loss {row['loss']:.4f}  {rate}  {eta}", flush=True)
    self._reset(now)
    return row

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _resume(exp, ckpt, state, workdir):
  """Resume order: the workdir's checkpoint > config.init_from > the fresh state.
  Returns (start step, state, restored meta or None)."""
  restored = ckpt.restore_latest(state, check=lambda data, meta: exp.pipeline.check_state(data))
  if restored is not None:
    start, state, data_state, meta = restored
    if meta.get('task_ids') != exp.task_ids:
      raise ValueError(f'checkpoint task map {meta.get("task_ids")} differs from the config\'s '
                       f'{exp.task_ids}.')
    exp.pipeline.set_state(data_state)
    print(f'resumed from {workdir} step {start}', flush=True)
    return start, state, meta
  if exp.config.init_from:
    model, opt = nnx.merge(exp.graphdef, state)
    model_state, got, kept = checkpoint_lib.restore_params(
        exp.config.init_from, nnx.state(model),
        upcycle_noise=exp.config.get('upcycle_noise', 0.0), seed=exp.config.seed)
    nnx.update(model, model_state)
    grow_lib.init_clones(model, kept)  # grown expert clones start as copies of their sources
    state = nnx.state(experiment.TrainState(model, opt))
    print(f'initialized from {exp.config.init_from}: {len(got)} arrays restored, {len(kept)} '
          f'new (e.g. {kept[:3]})', flush=True)
  return 0, state, None


@jax.jit
def _finite(state):
  """{path: all finite} of every floating array of a state."""
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(
      x.dtype, jnp.floating) else jnp.asarray(True), nnx.to_pure_dict(state))


def check_finite(state, step: int, ckpt, workdir: str) -> None:
  """Stops before a non-finite state is saved, naming the arrays and the last good step."""
  flags = checkpoint_lib.flat_paths(jax.device_get(_finite(state)))
  bad = sorted(k for k, ok in flags.items() if not ok)
  if bad:
    ckpt.wait()
    last = max(ckpt.steps(), default=None)
    raise FloatingPointError(
        f'the state after step {step} holds non-finite values in {len(bad)} arrays (e.g. '
        f'{bad[:3]}); not saved. ' + (f'The last good checkpoint is step {last} in {workdir}.'
                                     if last else 'No checkpoint was saved yet.'))


def train_and_evaluate(config, workdir: str, *, allow_config_changes: bool = False) -> dict:
  """Trains (resuming when workdir holds a checkpoint) and evaluates; returns the last
  evaluation's metrics (plus 'stopped_by' when a signal ended the run early).

  One trainer per workdir (a lock, process 0); a folder that cannot be written is refused
  before training; a resume that changes the model, batch size or schedule is refused unless
  `allow_config_changes` (see `pathways.train.workdir`)."""
  stop = signals.Stop()  # from here a signal is a clean stop, also during start-up
  lock = workdir_lib.Lock(workdir) if jax.process_index() == 0 else None
  try:
    return _train(config, workdir, stop, allow_config_changes)
  finally:
    stop.restore()
    if lock is not None:
      lock.release()


def _train(config, workdir, stop, allow_config_changes):
  if jax.process_index() == 0:
    checkpoint_lib.remove_unfinished(workdir)  # frees what a failed save took first
    workdir_lib.check_writable(workdir)
  exp = experiment.build(config)
  config = exp.config
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt.keep,
                                     best_metric=config.ckpt.best_metric or None)
  try:
    steps = ckpt.steps()
    if jax.process_index() == 0:
      workdir_lib.record_config(config, workdir, max(steps, default=0), bool(steps),
                                allow_changes=allow_config_changes)
    start, state, _ = _resume(exp, ckpt, exp.init_state(), workdir)
  except BaseException:
    ckpt.close()
    raise
  state = jax.device_put(state, exp.shardings)
  meta = {'task_ids': exp.task_ids, 'signature': experiment.model_signature(config)}
  train_step = jit_train_step(exp)
  eval_step = evaluation.make_eval_step(exp.model_graphdef)
  routing_forward = collect_lib.make_forward(exp.model_graphdef)

  def run_eval(state, step):
    model_state = state['model']
    eval_pipe = exp.eval_pipeline()
    result = evaluation.evaluate(eval_step, model_state, (
        exp.put(next(eval_pipe)) for _ in range(config.train.eval_batches)), tasks=exp.tasks)
    # The routing report's scalars and heatmaps (one process: the records are per example).
    if config.train.get('routing_batches', 0) and jax.process_count() == 1:
      eval_pipe = exp.eval_pipeline()
      record = collect_lib.collect(
          exp.model_graphdef, model_state,
          (next(eval_pipe) for _ in range(config.train.routing_batches)),
          forward=routing_forward)
      stats = summary_lib.summarize(record, shuffle_repeats=3)
      for layer, s in stats['layers'].items():
        result[f'routing/{layer}/nmi'] = s['nmi']
        result[f'routing/{layer}/nmi_shuffled'] = s['nmi_shuffled_mean']
        result[f'routing/{layer}/load_cv'] = s['load_cv']
        writer.figure(step, f'routing/{layer}/task_x_expert',
                      report_lib.heatmap(layer, s, stats['task_names']))
    return result

  writer = metric_writer.MetricWriter(workdir, resume_step=start,
                                      enabled=jax.process_index() == 0)
  peak, peak_source = peak_lib.peak_flops(jax.devices()[0], config.model.dtype)
  print(f'MFU against {peak and peak * jax.device_count():.3g} FLOP/s ({peak_source}, '
        f'{jax.device_count()} devices)' if peak else f'MFU not reported: {peak_source}',
        flush=True)
  meter = _Meter(start, config.train.num_steps, config.train.log_every,
                 peak and peak * jax.device_count())
  total = config.train.num_steps
  profile = tuple(config.train.get('profile_steps', ()))
  last_eval, pending = {}, None
  # step -> (when, seconds) the loop waited for its batch (host loading + transfer)
  waits = {}

  def finish(step, scalars, state):
    """Reads a step's scalars (the host waits here), checks them, logs them."""
    nonlocal last_eval
    began, waited = waits.pop(step, (0.0, 0.0))
    scalars = dict(jax.device_get(scalars), data_wait_s=waited, data_wait_began=began)
    for key in sorted(scalars, key=lambda k: k != 'loss'):  # the loss first, then the rest
      value = scalars[key]
      if not np.all(np.isfinite(value)):
        ckpt.wait()
        last = max(ckpt.steps(), default=None)
        raise FloatingPointError(
            f'{key} = {value} at step {step}: not finite; stopping. ' +
            (f'The last good checkpoint is step {last} in {workdir}.' if last else
             'No checkpoint was saved yet.'))
    row = meter.add(step, scalars) or {}
    if state is not None and (step % config.train.eval_every == 0 or step == total):
      with meter.pause():
        last_eval = run_eval(state, step)
      row = dict(row or scalars, **last_eval)
      print(f'step {step} ' + ' '.join(f'{k}={v:.4g}' for k, v in last_eval.items()
                                       if k.endswith('accuracy')), flush=True)
    if row:
      writer.write(step, row)

  mesh_context = jax.set_mesh(exp.mesh)  # MoE layers trace expert parallel under it
  mesh_context.__enter__()
  # built ahead in a thread (closed below on every exit); get_state() is that of the batches
  # taken (exact resume)
  pipe = prefetch_lib.Prefetcher(exp.pipeline,
                                 config.data.get('prefetch', prefetch_lib.DEFAULT_DEPTH))
  failed = True
  try:
    if stop.agreed():
      print(f'{stop.requested} during start-up: nothing trained; exiting.', flush=True)
      failed = False
      return {'stopped_by': stop.requested}
    step = start
    for step in range(start + 1, total + 1):
      began, waiting = time.time(), time.perf_counter()
      batch = exp.put(next(pipe))
      waits[step] = (began, time.perf_counter() - waiting)
      boundary = (step % config.ckpt.every == 0 or step % config.train.eval_every == 0
                  or step == total)
      if profile and step == profile[0] and jax.process_index() == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'profile'))
      state, scalars = train_step(state, batch)
      if profile and step == profile[1] and jax.process_index() == 0:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        print(f'profile of steps {profile[0]}-{profile[1]} in {workdir}/profile (TensorBoard\'s '
              f'profile plugin reads it)', flush=True)
      if pending is not None:
        finish(*pending, None)
        pending = None
      stopping = stop.agreed()
      if boundary or stopping:
        finish(step, scalars, state)  # checked before it is saved
        if step % config.ckpt.every == 0 or step == total or stopping:
          check_finite(state, step, ckpt, workdir)
          writer.flush()  # what is logged up to a committed step survives a kill
          ckpt.save(step, state, pipe.get_state(), dict(meta, step=step), force=True)
          if last_eval and step % config.train.eval_every == 0:
            ckpt.save_best(step, state, pipe.get_state(), dict(meta, step=step), last_eval)
      else:
        pending = (step, scalars)
      if stopping:
        print(f'{stop.requested}: saved step {step}; exiting.', flush=True)
        last_eval = dict(last_eval, stopped_by=stop.requested)
        break
    if pending is not None:
      finish(*pending, None)
    failed = False
  finally:
    mesh_context.__exit__(None, None, None)
    # Cleanup never hides the error that ended the run, and never hangs on a second one.
    for close in (pipe.close, ckpt.wait, ckpt.close, writer.close, meter.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        if not failed:
          raise
        print(f'WARNING: while stopping after an error: {type(e).__name__}: {e}', flush=True)
  return last_eval
