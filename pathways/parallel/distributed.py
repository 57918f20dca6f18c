"""Many hosts through JAX's own distributed runtime.

Every process runs the same program; `initialize` must come before anything touches a
device. Modes:
  * 'off': one process (the default).
  * 'auto': `jax.distributed.initialize()` with no arguments: JAX finds the coordinator,
    the process count and this process's id on Cloud TPU pods and under SLURM (srun).
  * 'explicit': coordinator address (host:port of process 0), process count and id given
    (GPU nodes by hand, or any launcher that sets them).
After it, `jax.devices()` lists every process's devices and meshes span hosts; each process
loads only its blocks of the batch (`pipeline`), process 0 writes the metrics, and all
processes take part in each checkpoint save (orbax writes every array shard once).
"""
from __future__ import annotations

import jax

MODES = ('off', 'auto', 'explicit')


def initialize(mode: str = 'off', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> None:
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: must be one of {MODES}.')
  given = [name for name, v in (('coordinator_address', coordinator_address),
                                ('num_processes', num_processes),
                                ('process_id', process_id)) if v is not None]
  if mode != 'explicit' and given:
    raise ValueError(f'--{", --".join(given)} need --distributed=explicit (got '
                     f'--distributed={mode}; auto finds them itself).')
  if mode == 'off':
    return
  if mode == 'auto':
    jax.distributed.initialize()
    return
  missing = [name for name, v in (('coordinator_address', coordinator_address),
                                  ('num_processes', num_processes),
                                  ('process_id', process_id)) if v is None]
  if missing:
    raise ValueError(f'--distributed=explicit needs --{", --".join(missing)}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id}: must be in [0, --num_processes='
                     f'{num_processes}).')
  if ':' not in coordinator_address:
    raise ValueError(f'--coordinator_address={coordinator_address!r}: must be host:port.')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
