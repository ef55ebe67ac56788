"""Runs the simulation suite and writes DIR/results.json, DIR/REPORT.md and DIR/<name>.png.

    python -m sims [--quick | --smoke] [--only NAME[,NAME]] [--seeds N] [--out DIR] [--seed S] [--jobs N]
                   [--xla_level L]
    python -m sims --list

Exits 1 if a simulation raised (its verdict is ERROR); a REFUTED prediction is a result, not a
failure.
"""

from absl import app, flags

from sims import harness

_QUICK = flags.DEFINE_boolean("quick", False, "Quick path: fewer seeds and steps, same code.")
_SMOKE = flags.DEFINE_boolean("smoke", False, "Smoke path (CI): every simulation end to end with a few steps and "
                              "2 seeds; the verdicts mean nothing.")
_ONLY = flags.DEFINE_list("only", None, "Comma-separated simulation names (default: all).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Seeds per simulation (default: each one's own).",
                              lower_bound=1)
_OUT = flags.DEFINE_string("out", "sims_out", "Output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Base seed for the simulations' PRNG keys and the bootstrap.")
_REPS = flags.DEFINE_integer("bootstrap_reps", 2000, "Bootstrap replicates per interval.",
                             lower_bound=100)
_FIGURES = flags.DEFINE_boolean("figures", True, "Draw PNG figures (needs matplotlib).")
_JOBS = flags.DEFINE_integer("jobs", 2, "Simulations run at once (threads; one compiles while another computes). "
                             "Their numbers do not depend on it.", lower_bound=1)
_XLA_LEVEL = flags.DEFINE_integer("xla_level", 1, "XLA:CPU backend optimisation level, 0-3 (XLA's own default is 3); "
                                  "1 compiles in ~0.8x the CPU time at about the same speed on the sims' programs "
                                  "(bench/sims_compile.py). $XLA_FLAGS setting --xla_backend_optimization_level "
                                  "wins. Recorded in results.json.", lower_bound=0, upper_bound=3)
_LIST = flags.DEFINE_boolean("list", False, "List the simulations and exit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print("\n".join(harness.available()))
    return
  try:
    names = harness.select(_ONLY.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  harness.set_xla_backend_level(_XLA_LEVEL.value)
  harness.enable_compilation_cache()
  results = harness.run_suite(names, out=_OUT.value, quick=_QUICK.value, seeds=_SEEDS.value,
                              seed=_SEED.value, reps=_REPS.value, figures=_FIGURES.value,
                              smoke=_SMOKE.value, jobs=_JOBS.value)
  figures = " and figures" if _FIGURES.value else ""
  print(f"wrote {_OUT.value}/REPORT.md, results.json{figures}")
  if any(r["verdict"] == harness.ERROR for r in results["simulations"]):
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
