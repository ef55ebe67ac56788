"""Runs `python -m sims` with JAX's compile-time events counted; prints one JSON line at exit.

    DREAMJAX_SIMS_CACHE=/tmp/p/cache python bench/sims_profile.py --quick --out /tmp/p/out

Takes the same flags as `python -m sims`. The JSON line (on stdout, after the run) holds per
`jax.monitoring` duration event its count and seconds summed over the job threads (backend
compilation, tracing, lowering, persistent-cache hits), the number of backend compiles taking
≥ 1 s, and the run's wall seconds. On an empty cache it shows what a first run spends compiling.
"""

import atexit
import collections
import json
import os
import sys
import threading
import time

from absl import app
from jax import monitoring

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sims.__main__ import main  # pylint: disable=wrong-import-position

_LOCK = threading.Lock()
_SUMS: dict = collections.defaultdict(float)
_COUNTS: collections.Counter = collections.Counter()
_COMPILES: list = []
_T0 = time.perf_counter()


def _on_duration(event: str, duration: float, **_):
  with _LOCK:
    _SUMS[event] += duration
    _COUNTS[event] += 1
    if event.endswith("backend_compile_duration"):
      _COMPILES.append(duration)


def _report():
  print(json.dumps({"bench": "sims_profile", "argv": sys.argv[1:], "wall_s": time.perf_counter() - _T0,
                    "events": {k: {"n": _COUNTS[k], "sum_s": _SUMS[k]} for k in sorted(_SUMS)},
                    "backend_compiles_ge_1s": sum(d >= 1.0 for d in _COMPILES)}))


if __name__ == "__main__":
  monitoring.register_event_duration_secs_listener(_on_duration)
  atexit.register(_report)
  app.run(main)
