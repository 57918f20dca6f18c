"""The sparse mixture-of-experts feed-forward layer.

Dimension vocabulary (tensor names carry their shape, e.g. `x_BxLxD`, `buf_ExCxD`):
  B  batch (examples)            L  sequence length        T  tokens, T = B * L
  G  groups (capacity is per group; T = G * S)              S  tokens per group
  D  model width                 F  expert hidden width (per bank: F_i)
  E  real experts over all banks (bank i holds E_i)        E' E + null experts
  K  choices per token (top-k)   C  capacity: buffer slots per expert per group
  A  assignments per group, A = S * K, ordered choice-major (a = k * S + s)
  N  tasks

One call: router(x) -> a routing (`pathways.nn.routing`: token or expert choice), its
metrics and weighted auxiliary loss; per group, capacity and dispatcher move tokens into
[E, C, D] buffers, experts run, outputs are combined with the gate weights. The layer owns
the list of routing metrics (`ROUTING_METRICS`) that the trainer logs and the analysis
reads. Traced under a mesh of several devices (`jax.set_mesh`), the 'sorted' and 'ragged'
dispatchers run expert parallel (`pathways.parallel.expert_parallel`): groups over the
devices, experts over the 'expert' axis, tokens exchanged by all-to-all. Tokens whose
assignments were all dropped, or that took only null experts, or that are inactive
(padding, halted examples), get zero from this layer: the residual stream carries them.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from flax import struct

from pathways.nn import dispatch as dispatch_lib
from pathways.nn import experts as experts_lib
from pathways.nn import grouped_matmul as grouped_lib
from pathways.nn import router as router_lib
from pathways.parallel import expert_parallel

# Every metric an MoE layer reports, in one list: the router's (its auxiliary losses among
# them), then the dispatch's. 'router_load' and 'expert_load' are [E] vectors, the rest
# scalars. The trainer logs the scalars' means over layers; the analysis reads the same list.
ROUTING_METRICS = router_lib.ROUTER_METRICS + ('fraction_dropped', 'fraction_tokens_dropped',
                                               'computed_experts_per_token',
                                               'shared_flops_fraction', 'expert_load')
VECTOR_METRICS = ('router_load', 'expert_load')
SCALAR_METRICS = tuple(m for m in ROUTING_METRICS if m not in VECTOR_METRICS)


@functools.lru_cache(maxsize=None)
def _warn_once(message):
  logging.warning(message)


def _check_capacity_factor(name, value):
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not value > 0):
    raise ValueError(f'{name}={value!r}: must be a number > 0, or None for dropless.')


def _fine_grained(banks, router, granularity):
  """(banks, router spec) with every expert split into `granularity` narrower ones and k
  multiplied to match (Krajewski et al. 2024)."""
  if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
    raise ValueError(f'granularity={granularity!r}: must be an int >= 1.')
  if granularity == 1:
    return banks, router
  for e, f in banks:
    if f % granularity:
      raise ValueError(f'granularity={granularity}: every bank\'s hidden width must divide by '
                       f'it; bank ({e}, {f}) does not.')
  name, options = router_lib.parse(router)
  if name != 'top_k':
    raise ValueError(f'granularity={granularity}: fine-grained experts multiply the top_k '
                     f"router's k; router {name!r} has no k per token.")
  k = router_lib.resolved(router)['k']
  banks = [(e * granularity, f // granularity) for e, f in banks]
  return banks, dict(options, name=name, k=k * granularity)


@struct.dataclass
class MoEStats:
  """What one MoE call reports besides its output.

  Attributes:
    aux_loss: the router's auxiliary loss, weighted by the layer's `loss_weights`.
    metrics: {name: value} for every name in `ROUTING_METRICS`.
    flops_BxL: forward FLOPs each token spent here (router + computed experts at their
      real widths; null experts and dropped assignments cost nothing).
    expected_flops_BxL: differentiable expected FLOPs (token choice: the router softmax
      times each expert's FLOPs); the counted FLOPs, without gradient, for expert choice.
    record: the token-major routing record: 'expert_BxLxK', 'weight_BxLxK', 'kept_BxLxK'
      (expert choice: K = E, which experts took each token).
  """
  aux_loss: Any
  metrics: dict
  flops_BxL: Any
  expected_flops_BxL: Any
  record: dict


class MoELayer(nnx.Module):
  """Routed feed-forward block: router + expert banks + dispatcher.

  Args:
    d_model: D.
    banks: one (num_experts, hidden) pair per expert bank, e.g. ((8, 256),) or
      ((4, 128), (4, 512)) for narrow and wide experts in one layer.
    router: a router name or spec dict built through `pathways.nn.router.ROUTERS`, e.g.
      {'name': 'top_k', 'k': 2, 'num_null_experts': 1, 'noisy': True, 'route_on': 'token'}
      or {'name': 'expert_choice', 'k': 1}; see `TopKRouter` / `ExpertChoiceRouter`.
    capacity_factor: training capacity factor (> 0), or None for dropless (token choice).
    eval_capacity_factor: capacity factor when deterministic; defaults to capacity_factor.
    dispatcher: 'sorted' (fast default), 'einsum' (reference) or 'ragged' (dropless,
      GPU/TPU).
    grouped_matmul: the dropless dispatcher's grouped FFN
      (`pathways.nn.grouped_matmul.GROUPED_MATMULS`): 'ragged_dot' or 'pallas' (a tiled
      Pallas kernel; interpret mode on CPU). Only with dispatcher='ragged'.
    group_size: S, tokens per capacity group; None puts all T tokens in one group.
    num_tasks: N, for route_on='task'.
    causal: the layer serves per-position (causal) prediction; refuses expert choice.
    shared_experts: N always-on experts beside the routed ones (DeepSeekMoE, Dai et al.
      2024): every active token goes through them, unweighted, and their FLOPs count for
      every token. Held as one dense FFN of width N * shared_hidden (the sum of N FFNs is
      one FFN over their concatenated hidden units).
    shared_hidden: hidden width of each shared expert; None: the first bank's width (after
      granularity).
    granularity: G, fine-grained experts (Krajewski et al. 2024): every bank (E_i, F_i)
      becomes (G * E_i, F_i / G) and the router's k becomes G * k, so active FLOPs per token
      stay those of the coarse layer. G=1 is the layer as given. Pair with the router's
      routed_scale='expected' to keep the output scale independent of E.
    grown: experts added by the architecture search (`pathways.nn.grow`), each a
      (task id, source expert, hidden) triple: a task-owned expert that takes that task's
      assignments to `source` (a global id; a grown source names an earlier grown expert).
      The router does not see them (its logits and every other task's routing are
      unchanged); they get global ids E, E+1, ... after the routed experts, and null experts
      move after them. Token choice only.
    loss_weights: {router loss name: weight} (`router.AUX_LOSSES`): `MoEStats.aux_loss`.
    dtype: compute dtype of the experts (parameters and router stay float32).
    remat_hidden: the experts' backward recomputes their hidden activations (7 matmuls
      instead of 6) instead of keeping each expert's pre-activation [C, F] from the forward:
      less memory, more time; the numbers are the same (`experts.bank_ffn`).
    rngs: nnx.Rngs.
  """

  def __init__(self, d_model: int, banks: Sequence[tuple[int, int]],
               router: str | Mapping[str, Any] = 'top_k', *,
               capacity_factor: float | None = 1.25, eval_capacity_factor: float | None = -1.0,
               dispatcher: str = 'sorted', group_size: int | None = None, num_tasks: int = 0,
               causal: bool = False, shared_experts: int = 0, shared_hidden: int | None = None,
               granularity: int = 1, grown: Sequence[tuple[int, int, int]] = (),
               loss_weights: Mapping[str, float] | None = None, dtype=jnp.float32,
               remat_hidden: bool = False, grouped_matmul: str = 'ragged_dot',
               rngs: nnx.Rngs):
    if not isinstance(remat_hidden, bool):
      raise ValueError(f'remat_hidden={remat_hidden!r}: must be True or False.')
    grouped_lib.GROUPED_MATMULS.lookup(grouped_matmul)  # an unknown name fails here
    if grouped_matmul != 'ragged_dot' and dispatcher != 'ragged':
      raise ValueError(f'grouped_matmul={grouped_matmul!r} needs the dropless '
                       f"dispatcher='ragged' (got dispatcher={dispatcher!r}).")
    self.grouped_matmul = grouped_matmul
    if eval_capacity_factor == -1.0:
      eval_capacity_factor = capacity_factor
    self.dispatch_fn = dispatch_lib.DISPATCHERS.lookup(dispatcher)
    _check_capacity_factor('capacity_factor', capacity_factor)
    _check_capacity_factor('eval_capacity_factor', eval_capacity_factor)
    if dispatcher == 'ragged' and (capacity_factor is not None or eval_capacity_factor is not None):
      raise ValueError(f"dispatcher='ragged' is dropless: capacity_factor={capacity_factor!r} and "
                       f"eval_capacity_factor={eval_capacity_factor!r} must both be None.")
    if not banks or any(len(b) != 2 for b in banks):
      raise ValueError(f'banks={banks!r}: must be a non-empty sequence of (num_experts, hidden).')
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
      raise ValueError(f'group_size={group_size!r}: must be an int >= 1, or None.')
    if dtype not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f'dtype={dtype!r}: must be jnp.float32 or jnp.bfloat16.')
    banks, router = _fine_grained(banks, router, granularity)
    self.banks = nnx.List([experts_lib.ExpertBank(d_model, e, f, rngs=rngs) for e, f in banks])
    self.num_experts = sum(e for e, _ in banks)
    self.granularity = granularity
    if not isinstance(shared_experts, int) or isinstance(shared_experts, bool) or (
        shared_experts < 0):
      raise ValueError(f'shared_experts={shared_experts!r}: must be an int >= 0.')
    if shared_hidden is not None and (not isinstance(shared_hidden, int) or shared_hidden < 1):
      raise ValueError(f'shared_hidden={shared_hidden!r}: must be an int >= 1, or None (the '
                       f'first bank\'s width).')
    self.shared_experts = shared_experts
    if shared_experts:  # absent otherwise: checkpoints of layers without keep their tree
      self.shared = DenseFFN(d_model, shared_experts * (shared_hidden or banks[0][1]),
                             dtype=dtype, rngs=rngs)
    self.router = router_lib.build(router, d_model=d_model, num_experts=self.num_experts,
                                   num_tasks=num_tasks, causal=causal,
                                   loss_weights=loss_weights, rngs=rngs)
    name = router_lib.parse(router)[0]
    if self.router.fixed_capacity and (capacity_factor is None or eval_capacity_factor is None):
      raise ValueError(f"router={name!r} has no dropless mode: capacity_factor and "
                       f"eval_capacity_factor must be numbers > 0.")
    if getattr(self.router, 'renormalize', False) and self.router.k == 1:
      _warn_once('MoELayer(k=1, renormalize=True): the gate is the top probability divided by '
                 'itself, always 1.0, so the router learns only from the auxiliary losses. '
                 'Pass renormalize=False for Switch-style gates (gate = router probability).')
    self.grown_spec = tuple(tuple(int(v) for v in g) for g in grown)
    for j, (task, source, hidden) in enumerate(self.grown_spec):
      if not self.router.token_choice:
        raise ValueError(f"grown={list(grown)!r}: grown experts need a token-choice router "
                         f"(they take a task's assignments per token), not {name!r}.")
      if not 0 <= source < self.num_experts + j:
        raise ValueError(f'grown[{j}]={grown[j]!r}: source expert {source} must be a routed '
                         f'expert (0..{self.num_experts - 1}) or an earlier grown one.')
    if self.grown_spec:  # absent otherwise: checkpoints of ungrown layers keep their tree
      self.grown = nnx.List([experts_lib.ExpertBank(d_model, 1, h, rngs=rngs)
                             for _, _, h in self.grown_spec])
    self.d_model = d_model
    self.causal = causal
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.group_size = group_size
    self.dtype = dtype
    self.remat_hidden = remat_hidden

  @property
  def k(self) -> int:
    """Choices per token (token choice) or mean experts per token (expert choice)."""
    return self.router.k

  @property
  def route_on(self) -> str:
    return self.router.route_on

  def __call__(self, x_BxLxD, *, mask_BxL=None, task_ids_B=None, causal_B=None,
               logit_bias_BxLxE=None, deterministic: bool = True):
    """Applies the layer.

    Args:
      x_BxLxD: input tokens.
      mask_BxL: active tokens (False: padding or halted; such tokens take no expert).
      task_ids_B: task of each example (needed for route_on='task' and grown experts), or
        of each token ([B, L]: packed rows, several examples per row).
      causal_B: rows of per-position (causal) tasks; route_on='example' routes them on the
        mean of their tokens so far. None: every row is causal when the layer is.
      logit_bias_BxLxE: added to router logits (E' wide): per-task priors, -inf masks.
      deterministic: evaluation mode (eval capacity factor, no router noise).

    Returns:
      y_BxLxD (zero for tokens that reached no expert) and `MoEStats`.
    """
    b, l, _ = x_BxLxD.shape
    if mask_BxL is None:
      mask_BxL = jnp.ones((b, l), bool)
    routing, router_metrics, aux_loss = self.route(
        x_BxLxD, mask_BxL=mask_BxL, task_ids_B=task_ids_B, causal_B=causal_B,
        logit_bias_BxLxE=logit_bias_BxLxE, deterministic=deterministic)
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    c = routing.capacity(self.num_experts, self.k, cf)
    y_BxLxD, kept = self.apply_experts(x_BxLxD, routing, mask_BxL, c)
    return y_BxLxD, self.stats(routing, kept, mask_BxL, router_metrics, aux_loss)

  def apply_shared(self, x_BxLxD, mask_BxL):
    """The shared experts' output for every active token (zero for inactive ones)."""
    return self.shared(x_BxLxD) * mask_BxL[..., None].astype(x_BxLxD.dtype)

  def shared_flops_per_token(self) -> int:
    """Forward FLOPs every active token spends in the shared experts."""
    return self.shared.flops_per_token() if self.shared_experts else 0

  def _group_tokens(self, x_BxLxD, num_groups=None):
    t = x_BxLxD.shape[0] * x_BxLxD.shape[1]
    if num_groups is not None:
      if t % num_groups:
        raise ValueError(f'num_groups={num_groups} must divide the number of tokens T = {t}.')
      return t // num_groups
    # routers that mix a group's tokens (Soft MoE) keep each example in its own group
    s = self.group_size or (x_BxLxD.shape[1] if self.router.mixes_tokens else t)
    if t % s:
      raise ValueError(f'group_size={s} must divide the number of tokens T = B * L = {t}.')
    return s

  def route(self, x_BxLxD, *, mask_BxL=None, task_ids_B=None, causal_B=None,
            logit_bias_BxLxE=None, deterministic: bool = True, num_groups: int | None = None):
    """The router half of the layer: (routing with a leading G axis, router metrics,
    weighted auxiliary loss).

    `num_groups` overrides the layer's grouping (inference by buckets routes one group).
    """
    b, l, d = x_BxLxD.shape
    if d != self.d_model:
      raise ValueError(f'x_BxLxD.shape={x_BxLxD.shape}: last axis must be d_model={self.d_model}.')
    s = self._group_tokens(x_BxLxD, num_groups)
    g = b * l // s
    if mask_BxL is None:
      mask_BxL = jnp.ones((b, l), bool)
    if mask_BxL.shape != (b, l):
      raise ValueError(f'mask_BxL.shape={mask_BxL.shape}: must be (B, L) = {(b, l)}.')
    task_ids_GxS = None
    if task_ids_B is not None:
      if task_ids_B.shape not in ((b,), (b, l)):
        raise ValueError(f'task_ids_B.shape={task_ids_B.shape}: must be (B,) = {(b,)} or, per '
                         f'token (packed rows), (B, L) = {(b, l)}.')
      if task_ids_B.ndim == 1:
        task_ids_B = jnp.broadcast_to(task_ids_B[:, None], (b, l))
      task_ids_GxS = task_ids_B.reshape(g, s)
    if causal_B is None and self.causal:
      causal_B = jnp.ones((b,), bool)
    signal = router_lib.routing_signal(x_BxLxD, mask_BxL, self.route_on, causal_B)
    bias = None if logit_bias_BxLxE is None else logit_bias_BxLxE.reshape(g, s, -1)
    cf = self.eval_capacity_factor if deterministic else self.capacity_factor
    routing, metrics, aux_loss = self.router(
        signal.reshape(g, s, d), active_GxS=mask_BxL.reshape(g, s), task_ids_GxS=task_ids_GxS,
        logit_bias_GxSxE=bias, capacity_factor=cf, deterministic=deterministic)
    if self.grown_spec:
      if task_ids_GxS is None:
        raise ValueError('task_ids_B is required: this layer has grown experts, which serve '
                         'one task each.')
      routing = routing.redirect(self.num_experts, [(t, src) for t, src, _ in self.grown_spec],
                                 task_ids_GxS)
    return routing, metrics, aux_loss

  def all_banks(self) -> list:
    """Routed banks, then the grown experts (one-expert banks), in global id order."""
    return list(self.banks) + (list(self.grown) if self.grown_spec else [])

  @property
  def num_total_experts(self) -> int:
    """Routed plus grown experts: the global ids the dispatchers and records use."""
    return self.num_experts + len(self.grown_spec)

  def apply_experts(self, x_BxLxD, routing, mask_BxL, capacity: int):
    """The expert half: dispatch at `capacity` slots per expert per group, run, combine;
    plus the shared experts when the layer has them.

    Returns y_BxLxD and the kept assignments (the routing's assignment shape).
    """
    b, l, d = x_BxLxD.shape
    g = routing.num_groups
    s = b * l // g
    weights = [bank.weights() for bank in self.all_banks()]
    dispatch_fn = self.dispatch_fn
    mesh = expert_parallel.context_mesh()
    if mesh is not None and dispatch_fn in expert_parallel.PARALLEL:
      problem = expert_parallel.layout_problem(mesh, g, [w.shape[0] for w, _ in weights])
      if problem:
        expert_parallel.warn_once(problem)
      else:
        dispatch_fn = functools.partial(expert_parallel.PARALLEL[dispatch_fn], mesh=mesh)
    extra = ({'grouped_matmul': self.grouped_matmul}
             if self.dispatch_fn is dispatch_lib.dispatch_ragged else {})
    y_GxSxD, kept = dispatch_fn(x_BxLxD.reshape(g, s, d), routing, weights, capacity, self.dtype,
                                remat_hidden=self.remat_hidden, **extra)
    y_BxLxD = y_GxSxD.reshape(b, l, d)
    if self.shared_experts:
      y_BxLxD = y_BxLxD + self.apply_shared(x_BxLxD, mask_BxL)
    return y_BxLxD, kept

  def flops(self, routing, kept, mask_BxL):
    """Forward FLOPs [B, L] each token spent here: its router matmul and its computed
    experts at their real widths (null experts and dropped assignments cost nothing)."""
    b, l = mask_BxL.shape
    always = self.router.flops_per_token(self.d_model) + self.shared_flops_per_token()
    always = always * mask_BxL
    expert_flops_E = jnp.asarray(self.flops_per_token_per_expert(), jnp.float32)
    return always + routing.flops_GxS(kept, expert_flops_E).reshape(b, l)

  def stats(self, routing, kept, mask_BxL, router_metrics, aux_loss) -> MoEStats:
    """The call's `MoEStats` from its routing, the kept assignments and the router's part."""
    b, l = mask_BxL.shape
    active_GxS = mask_BxL.reshape(routing.num_groups, -1)
    kept_count_E = routing.kept_per_expert(kept, self.num_total_experts)
    dropped, tokens_dropped = routing.drops(kept, active_GxS)
    flops_BxL = self.flops(routing, kept, mask_BxL)
    shared = self.shared_flops_per_token() * jnp.sum(mask_BxL)
    metrics = dict(router_metrics,
                   fraction_dropped=dropped, fraction_tokens_dropped=tokens_dropped,
                   expert_load=kept_count_E / jnp.maximum(jnp.sum(kept_count_E), 1.0),
                   computed_experts_per_token=jnp.sum(kept) / jnp.maximum(jnp.sum(active_GxS), 1),
                   shared_flops_fraction=shared / jnp.maximum(jnp.sum(flops_BxL), 1.0))
    num_logits = self.router.num_logits
    f_E = jnp.asarray(self.flops_per_token_per_expert()[:self.num_experts]
                      + [0] * (num_logits - self.num_experts), jnp.float32)
    expected_GxS = routing.expected_flops_GxS(self.k, f_E)
    if expected_GxS is None:
      expected_BxL = jax.lax.stop_gradient(flops_BxL)
    else:
      expected_BxL = (self.router.flops_per_token(self.d_model) + self.shared_flops_per_token()
                      + expected_GxS.reshape(b, l)) * mask_BxL
    record = {f'{k}_BxLxK': v.reshape(b, l, -1) for k, v in routing.record(kept).items()}
    return MoEStats(aux_loss=aux_loss, metrics=metrics, flops_BxL=flops_BxL,
                    expected_flops_BxL=expected_BxL, record=record)

  def max_expert_load(self, routing):
    """Most valid assignments any expert receives in any group: the smallest dropless
    capacity for this routing (expert choice: its fixed C)."""
    return routing.max_expert_load(self.num_total_experts)

  def flops_per_token_per_expert(self) -> list[int]:
    """Forward FLOPs one token spends in each expert (global id order, grown experts
    last): real widths."""
    out = []
    for bank in self.all_banks():
      out += [bank.flops_per_token(self.d_model)] * bank.num_experts
    return out


class DenseFFN(nnx.Module):
  """The dense feed-forward block x -> gelu(x W_in) W_out: the baseline MoE is measured against."""

  def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.w_in_DxF = nnx.Param(init(rngs.params(), (d_model, hidden), jnp.float32),
                              logical_axes=('embed', 'mlp'))
    self.w_out_FxD = nnx.Param(init(rngs.params(), (hidden, d_model), jnp.float32),
                               logical_axes=('mlp', 'embed'))
    self.dtype = dtype

  def flops_per_token(self) -> int:
    """Forward FLOPs per token: two matmuls of D x F."""
    d, f = self.w_in_DxF.shape
    return 4 * d * f

  def __call__(self, x_BxLxD):
    # Flattened to 2-D: XLA:CPU runs the backward of a 3-D einsum (two contracting axes for
    # the weight gradient) about 1.5x slower than the same 2-D matmul.
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d).astype(self.dtype)
    h_TxF = jax.nn.gelu(x_TxD @ self.w_in_DxF[...].astype(self.dtype))
    y_TxD = h_TxF @ self.w_out_FxD[...].astype(self.dtype)
    return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype)
