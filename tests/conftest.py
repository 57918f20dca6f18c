"""Test-wide settings: CPU only (8 simulated devices), persistent compilation cache (set in
the environment too, so every subprocess a test starts shares it), float32 matmuls at full
precision."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Eight simulated CPU devices for the mesh tests (other tests use the first device).
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
# Tiny shapes: compilation, not execution, is the suite's time. LLVM's backend optimizations
# cost a third of it and change no result the tests compare (every comparison is within one
# setting; subprocesses inherit it).
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'


import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'jax')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_default_matmul_precision', 'highest')
