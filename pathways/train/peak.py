"""The peak FLOP/s that model FLOP/s are divided by to report MFU.

GPU/TPU: datasheet dense matmul peaks by device kind (bfloat16, and the rate XLA's default
float32 matmuls run at: TF32 on NVIDIA tensor cores, bfloat16 passes on TPUs). CPU: measured
once per process, the best of five runs of a jitted 1024 x 1024 float32 matmul on all the
process's CPU devices' cores (about 0.2 s). `PATHWAYS_PEAK_FLOPS` (FLOP/s per device)
overrides both.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

# device kind substring -> (bfloat16, float32) dense peak FLOP/s per chip
DATASHEET = {
    'H200': (989e12, 494e12), 'H100': (989e12, 494e12), 'A100': (312e12, 156e12),
    'TPU v5p': (459e12, 459e12), 'TPU v5 lite': (197e12, 197e12), 'TPU v5e': (197e12, 197e12),
    'TPU v4': (275e12, 275e12),
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted [n, n] @ [n, n] float32 matmuls."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(device=None, dtype: str = 'float32') -> tuple[float | None, str]:
  """(peak FLOP/s of one device, where the number comes from); (None, why) when unknown."""
  if os.environ.get('PATHWAYS_PEAK_FLOPS'):
    return float(os.environ['PATHWAYS_PEAK_FLOPS']), 'PATHWAYS_PEAK_FLOPS'
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return measured_cpu_peak(), 'measured float32 matmul'
  for kind, (bf16, f32) in DATASHEET.items():
    if kind.lower() in device.device_kind.lower():
      return (bf16 if dtype == 'bfloat16' else f32), f'datasheet {kind} {dtype}'
  return None, f'no peak known for {device.device_kind!r}; set PATHWAYS_PEAK_FLOPS'
