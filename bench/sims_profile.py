"""Runs `python -m sims` with JAX's compile-time events counted; prints one JSON line at exit.

    DREAMJAX_SIMS_CACHE=/tmp/p/cache python bench/sims_profile.py --quick --out /tmp/p/out

Takes the same flags as `python -m sims`. The JSON line (on stdout, after the run) holds per
`jax.monitoring` duration event its count and seconds summed over the job threads (backend
compilation, tracing, lowering, persistent-cache hits), the number of backend compiles taking
≥ 1 s, and the run's wall seconds. On an empty cache it shows what a first run spends compiling.

Each event is also attributed to the simulation running in its thread ("main" outside one) and
to the traced function's name: `by_simulation` holds per simulation the backend-compile, tracing
and lowering seconds and the number of backend compiles; `top_compiles` the functions (per
simulation) with the most backend-compile seconds. With several jobs the seconds are per thread,
so they include waiting for the other thread's work on the same cores. `compiles_by_function` counts
the backend compiles (and their seconds) per traced function over the whole run: `jit(train_steps)`
are the compiled fine-tuning programs (`sims.engine`), one per distinct program.
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
from sims import harness  # pylint: disable=wrong-import-position
from sims.__main__ import main  # pylint: disable=wrong-import-position

_LOCK = threading.Lock()
_SUMS: dict = collections.defaultdict(float)
_COUNTS: collections.Counter = collections.Counter()
_COMPILES: list = []
_T0 = time.perf_counter()
_PHASES = {"backend_compile_duration": "compile", "jaxpr_trace_duration": "trace",
           "jaxpr_to_mlir_module_duration": "lower"}
_BY_SIM: dict = collections.defaultdict(lambda: collections.defaultdict(float))
_BY_FUNCTION: dict = collections.defaultdict(lambda: [0, 0.0])  # (simulation, fun_name) -> [n, s]
_CURRENT = threading.local()  # the simulation this thread is running


def _attributed(run_simulation):
  def run(sim, **kw):
    _CURRENT.name = sim.name
    try:
      return run_simulation(sim, **kw)
    finally:
      _CURRENT.name = "main"
  return run


def _on_duration(event: str, duration: float, **kw):
  phase = _PHASES.get(event.rsplit("/", 1)[-1])
  sim = getattr(_CURRENT, "name", "main")
  with _LOCK:
    _SUMS[event] += duration
    _COUNTS[event] += 1
    if phase:
      _BY_SIM[sim][phase + "_s"] += duration
    if phase == "compile":
      _COMPILES.append(duration)
      _BY_SIM[sim]["compiles"] += 1
      entry = _BY_FUNCTION[(sim, kw.get("fun_name") or "?")]
      entry[0] += 1
      entry[1] += duration


def _report():
  top = sorted(_BY_FUNCTION.items(), key=lambda kv: -kv[1][1])[:25]
  by_sim = {s: {k: int(x) if k == "compiles" else x for k, x in v.items()}
            for s, v in sorted(_BY_SIM.items(), key=lambda kv: -kv[1].get("compile_s", 0.0))}
  by_function = collections.defaultdict(lambda: [0, 0.0])
  for (_, f), (n, t) in _BY_FUNCTION.items():
    by_function[f][0] += n
    by_function[f][1] += t
  print(json.dumps({"bench": "sims_profile", "argv": sys.argv[1:], "wall_s": time.perf_counter() - _T0,
                    "events": {k: {"n": _COUNTS[k], "sum_s": _SUMS[k]} for k in sorted(_SUMS)},
                    "backend_compiles_ge_1s": sum(d >= 1.0 for d in _COMPILES),
                    "by_simulation": by_sim,
                    "top_compiles": [{"simulation": s, "function": f, "n": n, "compile_s": t}
                                     for (s, f), (n, t) in top],
                    "compiles_by_function": {f: {"n": n, "compile_s": t} for f, (n, t) in
                                             sorted(by_function.items(), key=lambda kv: -kv[1][1])}}))


if __name__ == "__main__":
  harness.run_simulation = _attributed(harness.run_simulation)
  monitoring.register_event_duration_secs_listener(_on_duration)
  atexit.register(_report)
  app.run(main)
