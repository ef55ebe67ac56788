"""XLA:CPU backend optimisation level vs compile CPU and execution time of the sims' train function.

    python bench/sims_compile.py [--levels default,0,1,2,3] [--steps 60] [--seeds 3]

For each level, a fresh process (XLA_FLAGS=--xla_backend_optimization_level=L, or no flag for
'default'; no compilation cache) compiles the sims' shared fine-tuning program (`sims.engine`: Qwen3-style tiny
decoder at the standard batch, vmapped seeds, a while loop over the steps; here ORPO and APOLLO) in both gradient
modes and runs it twice. Prints
one JSON line: per level and mode the compile CPU seconds (user + system of the process while
XLA compiles; compilation is partly multi-threaded), compile wall seconds and the second run's
wall seconds, a SHA-256 of the run's outputs, the ratios of each level to XLA's default (no
flag), and which levels give outputs bit-identical to the default's (`same_as_default`). See BUILD.md for what this measured and which
level `python -m sims` uses.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, resource, sys, time
import numpy as np
import jax, jax.numpy as jnp
from dreamjax.model import init_params
from sims import engine, world as W
steps, seeds = int(sys.argv[1]), int(sys.argv[2])
cfg = W.model_config("qwen3")
keys = jax.random.split(jax.random.PRNGKey(0), seeds)
params = jax.vmap(lambda k: init_params(cfg, k))(keys)
pool = W.reference_pool(W.World.make(0))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
out = {}
for mode in ("full", "frozen"):
  fn, args = engine.program(cfg, engine.init(params), pool, engine.sample_indices(keys, 1024, W.BATCH),
                            engine.arm(steps, 1e-3), gradient_mode=mode)
  lowered = fn.trace(*args).lower()
  c0, t0 = cpu(), time.perf_counter()
  compiled = lowered.compile()
  c1, t1 = cpu(), time.perf_counter()
  first = jax.block_until_ready(compiled(*args))
  t2 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(first))).hexdigest()
  out[mode] = {"compile_cpu_s": c1 - c0, "compile_wall_s": t1 - t0, "run_s": time.perf_counter() - t2,
               "output_sha256": digest}
print(json.dumps(out))
"""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--levels", default="default,0,1,2,3", help="comma-separated: 'default' (no flag) or 0-3")
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--seeds", type=int, default=3)
  a = ap.parse_args()
  levels = a.levels.split(",")
  for level in levels:
    if level != "default" and level not in ("0", "1", "2", "3"):
      ap.error(f"--levels: {level!r} is neither 'default' nor 0-3")
  res = {}
  for level in levels:
    flags = "" if level == "default" else f"--xla_backend_optimization_level={level}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    env.pop("DREAMJAX_SIMS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(a.steps), str(a.seeds)], env=env, check=True,
                          capture_output=True, text=True)
    res[level] = json.loads(proc.stdout.strip().splitlines()[-1])
  ratios = {}
  if "default" in res:
    for level in levels:
      ratios[f"level{level}_vs_default"] = {
          mode: {k: res[level][mode][k] / res["default"][mode][k] for k in ("compile_cpu_s", "run_s")}
          for mode in res[level]}
  same = ({level: all(res[level][m]["output_sha256"] == res["default"][m]["output_sha256"] for m in res[level])
           for level in levels} if "default" in res else {})
  print(json.dumps({"bench": "sims_compile", "steps": a.steps, "seeds": a.seeds,
                    "levels": {str(k): v for k, v in res.items()}, "ratios": ratios, "same_as_default": same}))


if __name__ == "__main__":
  main()
