"""Context-frozen training at long contexts on a laptop CPU: step time and peak memory per context.

    python bench/long_context.py [--contexts 4096,8192,16384,32768] [--family qwen3] [--response 256]

A small model (d_model 128, vocab 4096; Qwen3: 2 attention layers; Qwen3.5: 4 layers, DeltaNet and
attention alternating — with a single attention layer, the last one, a frozen prefill would need none
of its attention over the context, and XLA drops that work), batch 1, one frozen ORPO + APOLLO step per context. Each context runs in a fresh
process (peak RSS is a per-process high-water mark), which compiles the step, runs it once, then
times --reps more. One JSON line per context, then a summary line with the ratios of the largest
context to the smallest: memory grows linearly when `rss_ratio` ≈ `context_ratio`; quadratic
growth (a T×S score matrix) would give `context_ratio`².
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def one(context: int, family: str, response: int, reps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np

  from dreamjax import model as M
  from dreamjax import optim
  from dreamjax.train import batch as batch_lib
  from dreamjax.train import step as step_lib

  common = dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_heads=4, num_kv_heads=2, head_dim=32,
                rope_theta=1e6)
  if family == "qwen3":
    cfg = M.ModelConfig(model_type="qwen3", num_layers=2, **common)
  else:
    cfg = M.ModelConfig(model_type="qwen3_5_text", num_layers=4, **common, partial_rotary_factor=0.25,
                        layer_types=(M.LINEAR, M.FULL) * 2, attn_output_gate=True, norm_zero_centered=True,
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                        linear_value_head_dim=32)
  rng = np.random.default_rng(0)
  toks = lambda n: rng.integers(3, cfg.vocab_size, n).tolist()
  batch = batch_lib.collate([batch_lib.TokenizedExample(toks(context), toks(response), toks(response))], context,
                            response)
  opt = optim.apollo(1e-5, rank=32)
  state = step_lib.init_train_state(M.init_params(cfg, jax.random.PRNGKey(0)), opt)
  step = step_lib.make_train_step(cfg, "orpo", opt, "frozen", donate=False)
  t0 = time.perf_counter()
  jax.block_until_ready(step(state, batch))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - t0)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return {"bench": "long_context", "device": jax.devices()[0].platform, "family": family, "context": context,
          "response": response, "batch": 1, "d_model": 128, "layers": cfg.num_layers, "step_s": round(statistics.median(times), 3),
          "first_step_s": round(first, 1), "peak_rss_gb": round(peak / 1e9, 3)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--contexts", default="4096,8192,16384,32768")
  ap.add_argument("--family", choices=["qwen3", "qwen3_5"], default="qwen3")
  ap.add_argument("--response", type=int, default=256)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process: one context
  args = ap.parse_args()
  if args.one:
    print(json.dumps(one(args.one, args.family, args.response, args.reps)), flush=True)
    return
  lines = []
  for context in (int(c) for c in args.contexts.split(",")):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(context), "--family", args.family,
           "--response", str(args.response), "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
      line = {"bench": "long_context", "family": args.family, "context": context, "failed": out.returncode,
              "stderr_tail": out.stderr[-400:]}
    else:
      line = json.loads(out.stdout.strip().splitlines()[-1])
      lines.append(line)
    print(json.dumps(line), flush=True)
  if len(lines) >= 2:
    lo, hi = lines[0], lines[-1]
    print(json.dumps({"bench": "long_context_summary", "family": args.family,
                      "contexts": [lo["context"], hi["context"]], "context_ratio": hi["context"] / lo["context"],
                      "rss_ratio": round(hi["peak_rss_gb"] / lo["peak_rss_gb"], 2),
                      "step_time_ratio": round(hi["step_s"] / lo["step_s"], 2)}), flush=True)


if __name__ == "__main__":
  main()
