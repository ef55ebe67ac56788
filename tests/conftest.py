"""Test setup: 8 fake CPU devices for the multi-device tests (must precede the first jax import).

Most of the suite's time is XLA:CPU compilation; the tests trade generated-code speed for compile
speed (backend optimisation level 0, no expensive LLVM passes: ~40% less wall time). Subprocesses
started by tests inherit the same flags, so bitwise comparisons across processes still hold.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_sessionfinish(session, exitstatus):
  """Keeps the end of a run free of a stray traceback: pytest-xdist interrupts (SIGINT) a worker
  still busy 5 s after it was told to finish (JAX and Orbax tear down slowly), and the interrupt
  landing inside JAX's garbage-collection callback printed "Exception ignored in
  _xla_gc_callback ... KeyboardInterrupt"; elsewhere the worker's own loop catches it."""
  del session, exitstatus
  import gc  # pylint: disable=g-import-not-at-top

  gc.callbacks[:] = [cb for cb in gc.callbacks if getattr(cb, "__name__", "") != "_xla_gc_callback"]
