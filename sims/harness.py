"""The simulation harness: the Simulation record, the registry, vmapped seeds and the suite runner.

A simulation is one module `sims/<name>.py` (name `sim_*` or a letter, digits and `_`: `p1_...`,
`s4_...`, `x10_...`) that defines `SIMULATION = harness.Simulation(...)`. Its criteria and
controls are data on that record, so they exist before `run` is called; the runner writes them
(with a SHA-256 and a timestamp) to results.json *before* running the simulation, then the data,
then the analysis. A verdict is a pure function of results.json (`sims.report`).

    from sims import harness

    def run(seeds, quick, key):
      def one_seed(key):                     # everything per seed: init, data order, training
        ...
        return {'forgetting': f, 'accuracy': a}   # scalars, or [K] per stratum (task)
      return {arm: harness.vmap_seeds(functools.partial(one_seed_for, arm), key, seeds)
              for arm in ARMS}               # the same key for every arm: arms are matched

    SIMULATION = harness.Simulation(
        name='p1_lr_diversity', question=..., prediction=..., setup=..., arms={...},
        criteria=[harness.Criterion(arm='high_diverse', metric='forgetting', statistic='iqm',
                                    threshold=2.0, direction='less', description=...)],
        controls=[harness.Control(kind='positive', ...)], run=run)

`python -m sims` runs the suite (see `sims/__main__.py`); `run_suite` is the same from Python.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import platform
import re
import concurrent.futures
import subprocess
import sys
import threading
import time
import traceback
import zlib
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, TextIO

import numpy as np

from sims import report
from sims.jsonio import jsonable, write_json  # noqa: F401  (re-exported: sims import them from here)
from sims import stats
from sims.stats import (ERROR, INCONCLUSIVE, REFUTED, SUPPORTED, Control, Criterion,  # noqa: F401
                        Effect)

SCHEMA = 1
# The smoke path (`python -m sims --smoke`, CI): every loop cut to a few steps; each simulation
# module reads its module-level SMOKE dict (None outside the smoke path) with these keys.
SMOKE_SETTINGS = {"steps": 2, "pretrain_steps": 2, "eval_n": 8}
SMOKE_SEEDS = 2
SIM_MODULE = re.compile(r"^(sim_[a-z0-9_]+|[a-z]\d+_[a-z0-9_]+)$")

# run(seeds, quick, key) -> {arm: {metric: array [seeds, ...]}} or Outcome
RunFn = Callable[[int, bool, Any], Any]


class Outcome(NamedTuple):
  """What a simulation's `run` may return instead of the bare data dict."""

  data: Mapping[str, Mapping[str, Any]]  # {arm: {metric: array [seeds] or [seeds, K]}}
  config: Mapping[str, Any] = {}  # the settings actually used (steps, sizes, lr mapping), JSON-able
  notes: Sequence[str] = ()  # computed remarks for the report (never hand-typed numbers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Simulation:
  """One pre-registered simulation: what it asks, what it predicts, how it is judged, and `run`."""

  name: str  # equals the module name, e.g. 'p1_lr_diversity'
  question: str  # the question in one or two sentences
  prediction: str  # the prediction as stated in the theory or the issue, verbatim
  setup: str  # world, model, sizes, steps, data; markdown
  arms: Mapping[str, str]  # arm -> what it does; `run` must return exactly these arms
  criteria: Sequence[Criterion]  # the prediction's pass rules (a conjunction)
  run: RunFn  # run(seeds, quick, key) -> {arm: {metric: [seeds, ...]}} or Outcome
  controls: Sequence[Control] = ()  # positive/negative controls; any failure → INCONCLUSIVE
  effects: Sequence[Effect] = ()  # further statistics reported with CIs, no threshold
  seeds: int = 8  # seeds in the full run
  quick_seeds: int = 4  # seeds under --quick (same code path, fewer steps)
  selfcheck: bool = False  # True only for the harness self-check: not a prediction
  amendment: str = ""  # the one allowed pre-first-full-run refinement of the criteria, and why
  # Relative run time, only to order the work: with jobs > 1 the longest start first, so the jobs
  # end together instead of one long simulation running alone at the end. No effect on results.
  cost: float = 1.0
  # Optional hooks. interpret(analysis, data) -> list[str] of computed notes;
  # plot(fig, data, analysis) draws a custom figure on a matplotlib Figure.
  interpret: Optional[Callable[[dict, dict], Sequence[str]]] = None
  plot: Optional[Callable[..., None]] = None

  def __post_init__(self):
    if not SIM_MODULE.match(self.name):
      raise ValueError(f"simulation name {self.name!r} must match {SIM_MODULE.pattern}")
    if not self.criteria:
      raise ValueError(f"{self.name}: declare at least one criterion")
    object.__setattr__(self, "criteria", tuple(self.criteria))
    object.__setattr__(self, "controls", tuple(self.controls))
    object.__setattr__(self, "effects", tuple(self.effects))
    object.__setattr__(self, "arms", dict(self.arms))
    for rule in self.criteria:
      if type(rule) is not Criterion:
        raise TypeError(f"{self.name}: criteria must be Criterion, got {type(rule).__name__}")
    for rule in self.controls:
      if not isinstance(rule, Control):
        raise TypeError(f"{self.name}: controls must be Control, got {type(rule).__name__}")
    for rule in (*self.criteria, *self.controls, *self.effects):
      for arm, _ in rule.operands():
        if arm not in self.arms:
          raise ValueError(f"{self.name}: rule {rule.title()!r} reads undeclared arm {arm!r}")
    if self.seeds < 1 or self.quick_seeds < 1:
      raise ValueError(f"{self.name}: seeds must be >= 1")
    if not self.cost > 0:
      raise ValueError(f"{self.name}: cost must be > 0, got {self.cost}")

  def rules_json(self) -> dict:
    """Returns the pre-registered rules as JSON-ready data."""
    return {"criteria": [r.to_json() for r in self.criteria],
            "controls": [r.to_json() for r in self.controls],
            "effects": [r.to_json() for r in self.effects]}


# ---------------------------------------------------------------------------------------------
# Registry.


def available() -> list[str]:
  """Returns the simulation names found under sims/: the self-check first, then natural order."""
  import sims  # pylint: disable=import-outside-toplevel
  names = [m.name for m in pkgutil.iter_modules(sims.__path__) if SIM_MODULE.match(m.name)]
  natural = lambda n: (not n.startswith("sim_"), [int(t) if t.isdigit() else t
                                                   for t in re.split(r"(\d+)", n)])
  return sorted(names, key=natural)


def select(only: Optional[Sequence[str]] = None) -> list[str]:
  """Returns the names to run: all, or `only` in the order given; raises on unknown names."""
  names = available()
  if not only:
    return names
  unknown = [n for n in only if n not in names]
  if unknown:
    raise ValueError(f"unknown simulation(s): {', '.join(unknown)}; available: {', '.join(names)}")
  return list(dict.fromkeys(only))


def load(name: str, smoke: bool = False) -> Simulation:
  """Imports `sims.<name>` and returns its SIMULATION; smoke=True sets the module's SMOKE settings."""
  module = importlib.import_module(f"sims.{name}")
  if hasattr(module, "SMOKE"):
    module.SMOKE = dict(SMOKE_SETTINGS) if smoke else None
  sim = getattr(module, "SIMULATION", None)
  if not isinstance(sim, Simulation):
    raise TypeError(f"sims/{name}.py must define SIMULATION = harness.Simulation(...)")
  if sim.name != name:
    raise ValueError(f"sims/{name}.py declares name {sim.name!r}; it must equal the module name")
  return sim


# ---------------------------------------------------------------------------------------------
# Seeds.


def seed_keys(key, n: int):
  """Returns n per-seed keys `jax.random.split(key, n)`: the same keys for every arm."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.random.split(key, n)


def vmap_seeds(fn: Callable, key, n: int, *, jit: bool = True, batch_size: Optional[int] = None):
  """Returns fn(k_s) for every key k_s of `seed_keys(key, n)`, stacked on a leading seed axis.

  The seeds run as one vmapped (and jitted) call. Pass the same `key` for every arm so that arm
  a and arm b see the same init and data order on seed s (matched arms); fold an arm's own
  randomness in inside `fn`. `batch_size` bounds memory: `jax.lax.map` over chunks of that many
  vmapped seeds instead of one vmap over all.

  Args:
    fn: key -> pytree of arrays (metrics for one seed).
    key: a PRNG key.
    n: the number of seeds.
    jit: jit the vmapped function.
    batch_size: seeds per vmapped chunk, or None for all at once.
  """
  import jax  # pylint: disable=import-outside-toplevel
  keys = seed_keys(key, n)
  if batch_size is None or batch_size >= n:
    mapped = jax.vmap(fn)
  else:
    mapped = lambda ks: jax.lax.map(fn, ks, batch_size=batch_size)
  return (jax.jit(mapped) if jit else mapped)(keys)


def sim_key(seed: int, name: str):
  """Returns the PRNG key for simulation `name` under base seed `seed` (independent streams)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def as_numpy(data: Mapping[str, Mapping[str, Any]], seeds: int, arms: Mapping[str, str]) -> dict:
  """Returns {arm: {metric: float64 array}} after checking arms and the leading seed axis."""
  got, want = set(data), set(arms)
  if got != want:
    raise ValueError(f"run returned arms {sorted(got)}, declared {sorted(want)}")
  out = {}
  for arm in arms:
    out[arm] = {}
    for metric, value in data[arm].items():
      a = np.asarray(value, dtype=np.float64)
      if a.ndim == 0 or a.shape[0] != seeds:
        raise ValueError(f"{arm}/{metric}: shape {a.shape}, want a leading seed axis of {seeds}")
      out[arm][metric] = a
  return out


# ---------------------------------------------------------------------------------------------
# JSON.


def environment() -> dict:
  """Returns the git commit and library versions behind a run."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                            check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  versions = {"python": platform.python_version(), "platform": platform.platform(),
              "numpy": np.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  for lib in ("jax", "jaxlib", "optax", "flax", "matplotlib"):
    try:
      versions[lib] = importlib.import_module(lib).__version__
    except ImportError:
      versions[lib] = None
  try:
    import jax  # pylint: disable=import-outside-toplevel
    versions["backend"] = jax.default_backend()
    versions["devices"] = [str(d) for d in jax.devices()]
  except Exception:  # pylint: disable=broad-except
    pass
  commit = git("rev-parse", "HEAD")
  dirty = git("status", "--porcelain", "--untracked-files=no")
  return {"git": {"commit": commit, "dirty": None if dirty is None else bool(dirty)},
          "versions": versions}


# ---------------------------------------------------------------------------------------------
# Running.


class Progress:
  """A progress bar across simulations on stderr: a redrawn line on a terminal, lines otherwise."""

  def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 24):
    self.total, self.width, self.done = total, width, 0
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.t0 = time.perf_counter()
    self.name = ""
    self.lock = threading.Lock()  # simulations may start from worker threads (run_suite jobs > 1)

  def _bar(self) -> str:
    filled = self.width * self.done // max(self.total, 1)
    elapsed = time.perf_counter() - self.t0
    eta = ""
    if 0 < self.done < self.total:
      eta = f", ETA {_clock(elapsed / self.done * (self.total - self.done))}"
    return (f"sims [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
            f" {_clock(elapsed)}{eta}")

  def start(self, name: str) -> None:
    with self.lock:
      self.name = name
      line = f"{self._bar()}  running {name}"
      self.stream.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
      self.stream.flush()

  def finish(self, name: str, verdict: str, seconds: float) -> None:
    with self.lock:
      self._finish(name, verdict, seconds)

  def _finish(self, name: str, verdict: str, seconds: float) -> None:
    self.done += 1
    result = f"  {name}: {verdict} ({seconds:.1f} s)"
    if self.tty:
      self.stream.write(f"\r\x1b[K{result}\n{self._bar()}")
      if self.done == self.total:
        self.stream.write("\n")
    else:
      self.stream.write(f"{result}\n{self._bar()}\n")
    self.stream.flush()


def _clock(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  return f"{m:02d}:{s:02d}"


def registration(sim: Simulation) -> dict:
  """Returns the static part of a record: the texts and the pre-registered rules, hashed."""
  rules = sim.rules_json()
  digest = hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()
  return {"name": sim.name, "selfcheck": sim.selfcheck, "question": sim.question,
          "prediction": sim.prediction, "setup": sim.setup, "arms": dict(sim.arms),
          "amendment": sim.amendment, **rules, "rules_sha256": digest,
          "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_simulation(sim: Simulation, *, seeds: int, quick: bool, key, bootstrap: Mapping[str, Any],
                   record: Optional[dict] = None) -> dict:
  """Runs one simulation and returns its record (registration, data, analysis, timings).

  Exceptions inside `run` or the analysis are caught: the record gets verdict ERROR and the
  traceback, so one broken simulation does not lose the others' results.
  """
  record = dict(record or registration(sim))
  record.update(seeds=seeds, quick=quick, config={}, notes=[], data=None, analysis=None,
                error=None, figure=None, timing={})
  t0 = time.perf_counter()
  try:
    out = sim.run(seeds, quick, key)
    if not isinstance(out, Outcome):
      out = Outcome(data=out)
    data = as_numpy(out.data, seeds, sim.arms)
    record["timing"]["run_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    analysis = stats.analyse(data, criteria=sim.criteria, controls=sim.controls,
                             effects=sim.effects, name=sim.name, **bootstrap)
    notes = list(out.notes) + list(sim.interpret(analysis, data) if sim.interpret else ())
    record["timing"]["analysis_s"] = time.perf_counter() - t1
    record.update(config=jsonable(out.config), notes=[str(n) for n in notes],
                  data=jsonable(data), analysis=jsonable(analysis))
  except Exception:  # pylint: disable=broad-except
    record["error"] = traceback.format_exc()
    record["timing"].setdefault("run_s", time.perf_counter() - t0)
  record["verdict"] = record["analysis"]["verdict"] if record["analysis"] else ERROR
  return record


def set_xla_backend_level(level: int) -> str:
  """Adds --xla_backend_optimization_level=level to $XLA_FLAGS (kept if $XLA_FLAGS sets it); returns $XLA_FLAGS.

  XLA:CPU's backend (LLVM) level: compilation is most of a cold run, and level 1 compiled the
  sims' train function in 0.74–0.94x the CPU time of XLA's default (which is level 3) at about the
  same execution speed (bench/sims_compile.py; BUILD.md). XLA reads the flags once, when JAX creates its
  CPU client, so this must run before the first computation.
  """
  if level not in (0, 1, 2, 3):
    raise ValueError(f"XLA backend optimisation level must be 0-3, got {level!r}")
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  from sims import world  # pylint: disable=import-outside-toplevel
  flags = os.environ.get("XLA_FLAGS", "")
  if world.xla_backend_level() is not None:
    return flags
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(f"--xla_backend_optimization_level={level} must be set before JAX initialises its backend "
                       "(it already has); set it in $XLA_FLAGS instead")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level={level}".strip()
  return os.environ["XLA_FLAGS"]


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache under the base-model cache folder (<cache>/xla),
  unless one is configured already; compilation is most of a simulation's time, so a second run
  of the suite on the same machine is much faster. Every program is cached, however fast it
  compiled: a suite also compiles ~600 small ones (eager ops, evaluations) that add up. Returns
  the folder in use."""
  import jax  # pylint: disable=import-outside-toplevel
  from sims import world  # pylint: disable=import-outside-toplevel
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = os.path.abspath(os.path.join(world.cache_dir(), "xla"))
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return folder


def run_suite(names: Optional[Sequence[str]] = None, *, out: str, quick: bool = False,
              seeds: Optional[int] = None, seed: int = 0, reps: int = 2000,
              confidence: float = 0.95, figures: bool = True,
              progress: Optional[TextIO] = None, smoke: bool = False, jobs: int = 1) -> dict:
  """Runs simulations, writing DIR/results.json, DIR/REPORT.md and DIR/<name>.png; returns results.

  Every simulation is registered (its rules hashed and written to results.json) before any runs;
  results.json is rewritten as each one finishes, so an interrupted suite keeps everything
  finished so far. Simulations start in order of decreasing `Simulation.cost` (ties: the order of
  `names`); records keep the order of `names` whatever order they finish in.

  Args:
    names: simulations to run (see `select`); None runs all.
    out: output folder (created).
    quick: the quick path: fewer seeds and steps, same code.
    seeds: seeds per simulation; None uses each simulation's `seeds` / `quick_seeds`.
    seed: base seed; simulation `name` gets `sim_key(seed, name)`.
    reps, confidence: bootstrap replicates and interval size.
    figures: draw PNG figures (needs matplotlib; without it the report says so).
    progress: stream for the progress bar (stderr by default).
    smoke: the smoke path: the quick path with SMOKE_SETTINGS (a few steps) and SMOKE_SEEDS seeds;
      checks that every simulation runs end to end, its verdicts mean nothing.
    jobs: simulations run at once, in threads of this process (JAX releases the GIL while it
      compiles and computes, so one simulation's single-threaded XLA compilation overlaps another's
      computation). A simulation's numbers do not depend on jobs: each is a pure function of its
      key, and what simulations share (base models, lr probes) is computed once under a lock.
  """
  if smoke:
    quick, seeds = True, seeds or SMOKE_SEEDS
  if jobs < 1:
    raise ValueError(f"jobs must be >= 1, got {jobs}")
  names = select(names)
  os.makedirs(out, exist_ok=True)
  bootstrap = {"reps": reps, "confidence": confidence, "seed": seed}
  results = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "command": list(sys.argv),
             "config": {"quick": quick, "smoke": smoke, "seeds": seeds, "only": list(names), "seed": seed,
                        "bootstrap": bootstrap, "figures": figures, "jobs": jobs},
             **environment(), "timing": {}, "simulations": []}
  path = os.path.join(out, "results.json")
  bar = Progress(len(names), progress)
  t0 = time.perf_counter()
  records, sims = {}, {}
  for name in names:  # load and register everything first, in the main thread
    try:
      sims[name] = load(name, smoke=smoke)
    except Exception:  # pylint: disable=broad-except
      records[name] = {"name": name, "selfcheck": False, "error": traceback.format_exc(),
                       "verdict": ERROR, "timing": {"total_s": 0.0}}
    else:
      records[name] = {**registration(sims[name]), "status": "registered, waiting"}

  def save():
    results["simulations"] = [records[n] for n in names]
    results["timing"]["total_s"] = time.perf_counter() - t0
    write_json(path, results)

  save()
  for name in names:
    if name not in sims:
      bar.finish(name, ERROR, 0.0)

  def work(name):
    t = time.perf_counter()
    bar.start(name)
    sim = sims[name]
    n = seeds or (sim.quick_seeds if quick else sim.seeds)
    record = {k: v for k, v in records[name].items() if k != "status"}
    record = run_simulation(sim, seeds=n, quick=quick, key=sim_key(seed, name), bootstrap=bootstrap,
                            record=record)
    return record, t

  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="sim") as pool:
    by_cost = sorted((n for n in names if n in sims), key=lambda n: -sims[n].cost)  # stable: ties keep order
    futures = {pool.submit(work, name): name for name in by_cost}
    try:
      for future in concurrent.futures.as_completed(futures):
        name = futures[future]
        record, t = future.result()
        if not figures:
          record["figure_note"] = "figures were not drawn (run with --nofigures)"
        elif record["data"] is not None:  # matplotlib stays in the main thread
          t1 = time.perf_counter()
          record["figure"], record["figure_note"] = report.draw_figure(record, out, plot=sims[name].plot)
          record["timing"]["figure_s"] = time.perf_counter() - t1
        record["timing"]["total_s"] = time.perf_counter() - t
        records[name] = record
        save()
        bar.finish(name, record["verdict"], record["timing"]["total_s"])
    except BaseException:
      for f in futures:  # do not start more; the running ones finish before the process exits
        f.cancel()
      raise
  report.write(out)
  return results
