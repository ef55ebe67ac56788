"""The prediction simulation suite: small synthetic worlds that test the theory on a laptop.

    python -m sims [--quick] [--only NAME[,NAME]] [--seeds N] [--out DIR]

- `sims/harness.py`: the `Simulation` record, the registry (one module per simulation, named
  `sim_*` or `p1_...`, `s4_...`, `x10_...`, each defining `SIMULATION`), seeds via `jax.vmap`,
  and the suite runner that writes results.json, REPORT.md and figures.
- `sims/stats.py`: IQM, stratified bootstrap intervals, probability of improvement, and the
  pre-registered decision rules (`Effect`, `Criterion`, `Control`) with their verdicts.
- `sims/report.py`: REPORT.md and figures from results.json alone (`python -m sims.report DIR`).
- `sims/world.py`: the synthetic token world, the tiny models, their cached base models and lr
  calibration; `sims/engine.py`: the one fine-tuning program every simulation trains with (one
  compile per model config, gradient mode, batch size and dropout; every arm setting traced).
- `sims/sim_selftest.py`: the harness self-check (a synthetic effect of known sign), not a
  prediction.

Importing this package imports nothing heavy; the harness imports jax only when seeds are run.
"""
