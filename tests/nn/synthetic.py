"""Synthetic tasks and batches for model tests that need no data set."""
import numpy as np
from flax import nnx

from pathways import task as task_lib
from pathways.data import layout as layout_lib
from pathways.nn import model as model_lib


def task(name, modality, head, shape, classes):
  return task_lib.Task(name=name, modality=modality, head=head, num_classes=classes,
                       data=lambda split, data_dir: None, splits={'train': 'a', 'eval': 'b'},
                       input_feature='x', target_feature='y', input_shape=shape,
                       input_dtype='uint8' if modality == 'image' else 'int32')


def image_and_text(slots=(7, 5), seed=0, **model_kwargs):
  """A model over an 8x8 image classification task and a 16-byte language-modelling task,
  and one batch of them. Example i of the image task is bright in its first i rows, so
  examples differ in a way that survives layer norm."""
  tasks = [task('images', 'image', 'classify', (8, 8, 1), 10),
           task('text', 'bytes', 'per_position', (16,), 256)]
  layout = layout_lib.make_layout(tasks, slots)
  kwargs = dict(d_model=32, num_layers=4, num_heads=2, mlp_hidden=48, patch=2)
  kwargs.update(model_kwargs)
  m = model_lib.Figure1Model(tasks, layout, rngs=nnx.Rngs(seed), **kwargs)
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 17, slots[1])
  tokens = rng.integers(1, 256, (slots[1], 16)).astype(np.int32)
  mask = np.arange(16)[None] < lengths[:, None]
  bright = np.arange(8)[None, :, None, None] < np.arange(slots[0])[:, None, None, None]
  batch = {'task_id': np.repeat(np.arange(2), slots).astype(np.int32),
           'image': np.where(bright, 255, 0).astype(np.uint8) * np.ones((1, 8, 8, 1), np.uint8),
           'tokens': tokens * mask, 'tokens_mask': mask,
           'label': np.concatenate([rng.integers(0, 10, slots[0]), -np.ones(slots[1])]).astype(
               np.int32),
           'targets': np.where(mask, np.roll(tokens * mask, -1, axis=1), -1).astype(np.int32),
           'weight': np.ones((sum(slots),), np.float32)}
  return m, batch


ROUTER_OPTIONS = ('k', 'num_null_experts', 'top_p', 'renormalize', 'noisy', 'route_on',
                  'jitter', 'priority', 'balance_rate', 'routed_scale', 'slots_per_expert',
                  'normalize')


def moe_kwargs(**flat):
  """MoE layer arguments from one flat dict: the router name ('router') and its options
  (k, num_null_experts, top_p, renormalize, noisy, route_on) become the router spec dict."""
  spec = {'name': flat.pop('router', 'top_k')}
  spec.update({k: flat.pop(k) for k in ROUTER_OPTIONS if k in flat})
  if spec['name'] == 'soft':
    spec.pop('k', None)
  return dict(flat, router=spec)


def moe_layer(d_model, banks, k, *, rngs=None, **flat):
  """`MoELayer(d_model, banks, router={'name': ..., 'k': k, ...}, ...)` from flat options."""
  from pathways.nn import moe  # pylint: disable=g-import-not-at-top
  return moe.MoELayer(d_model, banks, rngs=rngs or nnx.Rngs(0), **moe_kwargs(k=k, **flat))


@nnx.jit(static_argnames='deterministic')
def forward(m, batch, deterministic=True):
  """One compiled forward pass (eager op-by-op execution compiles every small op: slow)."""
  return m(batch, deterministic=deterministic)
