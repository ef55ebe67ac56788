"""Frozen vs full ORPO step: median step time, compiled peak memory and FLOPs, with ratios.

    python bench/step.py [--families qwen3,qwen3_5] [--contexts 512,2048,8192] [--time_max_context 2048]

One JSON line per (family, context). Model: d_model 256, 4 layers (Qwen3.5: 3 DeltaNet + 1 full),
batch 4, response 128, APOLLO. FLOPs and memory come from XLA's compiled cost and memory analysis
(nothing is allocated for those); step time is measured only up to --time_max_context, since a
full-backprop step at 8K context does not fit a laptop CPU's patience.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax import model as M
from dreamjax import optim
from dreamjax.train import batch as batch_lib
from dreamjax.train import step as step_lib


def bench_config(family: str) -> M.ModelConfig:
  if family == "qwen3":
    return M.ModelConfig(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6)
  return M.ModelConfig(model_type="qwen3_5_text", vocab_size=4096, hidden_size=256, intermediate_size=704,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                       partial_rotary_factor=0.25, layer_types=(M.LINEAR,) * 3 + (M.FULL,), attn_output_gate=True,
                       norm_zero_centered=True, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=64, linear_value_head_dim=64, chunk_size=64)


def make_batch(cfg, b, c, r, seed=0):
  rng = np.random.default_rng(seed)
  exs = [batch_lib.TokenizedExample(rng.integers(3, cfg.vocab_size, c).tolist(),
                                    rng.integers(3, cfg.vocab_size, r).tolist(),
                                    rng.integers(3, cfg.vocab_size, r).tolist()) for _ in range(b)]
  return batch_lib.collate(exs, c, r)


def measure(cfg, mode, batch, time_it, reps):
  opt = optim.apollo(1e-5, rank=32)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  state = step_lib.init_train_state(params, opt)
  step = step_lib.make_train_step(cfg, "orpo", opt, mode, donate=False)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  out = {"flops": float(cost.get("flops", float("nan"))),
         "temp_bytes": int(mem.temp_size_in_bytes),
         "peak_bytes": int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)}
  if time_it:
    jax.block_until_ready(compiled(state, batch))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, batch))
      times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--families", default="qwen3,qwen3_5")
  ap.add_argument("--contexts", default="512,2048,8192")
  ap.add_argument("--response", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--time_max_context", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  for family in args.families.split(","):
    cfg = bench_config(family)
    for c in [int(x) for x in args.contexts.split(",")]:
      batch = make_batch(cfg, args.batch, c, args.response)
      time_it = c <= args.time_max_context
      res = {m: measure(cfg, m, batch, time_it, args.reps) for m in ("frozen", "full")}
      r = args.response
      line = {"bench": "step", "device": jax.devices()[0].platform, "family": family, "context": c,
              "response": r, "batch": args.batch, "frozen": res["frozen"], "full": res["full"],
              "flop_ratio_full_over_frozen": res["full"]["flops"] / res["frozen"]["flops"],
              "temp_memory_ratio_full_over_frozen": res["full"]["temp_bytes"] / res["frozen"]["temp_bytes"],
              "flop_bound_6(C+R)/(C+6R)": 6 * (c + r) / (c + 6 * r)}
      if time_it:
        line["time_ratio_full_over_frozen"] = res["full"]["step_s"] / res["frozen"]["step_s"]
      print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
