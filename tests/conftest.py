"""Test-wide settings: CPU only (8 simulated devices), persistent compilation cache,
float32 matmuls at full precision."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Eight simulated CPU devices for the mesh tests (other tests use the first device).
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.cache', 'jax')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_default_matmul_precision', 'highest')
