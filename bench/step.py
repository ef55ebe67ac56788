"""The ORPO train step: frozen vs full, and side by side with a TRL-style torch step on the same model.

    python bench/step.py                      # frozen vs full: step time, compiled memory and FLOPs
    python bench/step.py --side_by_side       # + peak RSS, and a torch/transformers step if installed

Default mode: one JSON line per (family, context). Model: d_model 256, 4 layers (Qwen3.5: 3
DeltaNet + 1 full), vocab --vocab, batch 4, response 128, APOLLO. FLOPs and memory come from XLA's
compiled cost and memory analysis (nothing is allocated for those); step time is measured only up
to --time_max_context.

--side_by_side: at one context (default 2048), response 128, batch 4, Qwen3, each of these runs in
a fresh process (peak RSS is a per-process high-water mark), compiles, steps once, then times
--reps steps:
  jax_full    this project's full-backprop ORPO step with AdamW (what TRL does, in JAX)
  jax_frozen  this project's context-frozen ORPO step with APOLLO (the defaults of launch.train)
  torch       a TRL-style ORPO step: transformers' Qwen3ForCausalLM (the same weights, exported with
              dreamjax.model.hf.save_hf), chosen and rejected concatenated into one forward over
              context + response, log-probs of the response tokens, ORPO loss (NLL + λ·log-odds
              term), backward, torch.optim.AdamW; float32, 2 threads. Skipped without torch and
              transformers (`pip install -e ".[parity]"`).
Then one JSON line with each variant's median step time, peak RSS (the whole process: import,
compilation, steps) and steady RSS (the peak over the timed steps, after the first step's
compilation memory was freed and handed back), and their ratios to torch.
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from dreamjax import model as M
from dreamjax import optim
from dreamjax.train import batch as batch_lib
from dreamjax.train import step as step_lib


def bench_config(family: str, vocab: int) -> M.ModelConfig:
  if family == "qwen3":
    return M.ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=256, intermediate_size=704, num_layers=4,
                         num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6)
  return M.ModelConfig(model_type="qwen3_5_text", vocab_size=vocab, hidden_size=256, intermediate_size=704,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                       partial_rotary_factor=0.25, layer_types=(M.LINEAR,) * 3 + (M.FULL,), attn_output_gate=True,
                       norm_zero_centered=True, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=64, linear_value_head_dim=64, chunk_size=64)


def make_tokens(cfg, b, c, r, seed=0):
  """Returns (context, chosen, rejected) int arrays (B, C), (B, R), (B, R): every token real."""
  rng = np.random.default_rng(seed)
  return (rng.integers(3, cfg.vocab_size, (b, c)), rng.integers(3, cfg.vocab_size, (b, r)),
          rng.integers(3, cfg.vocab_size, (b, r)))


def make_batch(cfg, b, c, r, seed=0):
  ctx, cho, rej = make_tokens(cfg, b, c, r, seed)
  exs = [batch_lib.TokenizedExample(ctx[i].tolist(), cho[i].tolist(), rej[i].tolist()) for i in range(b)]
  return batch_lib.collate(exs, c, r)


def timed(fn, reps):
  """Returns (first call s, median of `reps` further calls s); fn blocks until its result is ready.

  After the first call (compilation, allocator warm-up) freed heap memory is handed back to the
  OS (glibc malloc_trim) and the process's peak-RSS mark is reset, so `steady_rss_gb()` afterwards
  is the high-water mark of the timed steps alone, without what compilation used and freed.
  """
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  _FIRST_PEAK[0] = peak_rss_gb()  # resetting the mark also resets getrusage's maximum
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:  # not glibc
    pass
  reset_peak_rss()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


_FIRST_PEAK = [0.0]  # peak RSS up to the end of the first timed call (before the mark is reset)


def peak_rss_gb() -> float:
  """Returns the process's peak RSS since it started (GB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def reset_peak_rss() -> None:
  """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0; no-op elsewhere)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def steady_rss_gb() -> float:
  """Returns VmHWM (GB): the peak RSS since the last reset_peak_rss (or NaN where /proc has none)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return float("nan")


# ---------------------------------------------------------------------------------------------
# Default mode: frozen vs full, compiled cost and memory.


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
    out["step_s"] = timed(lambda: jax.block_until_ready(compiled(state, batch)), reps)[1]
  return out


def frozen_vs_full(args):
  for family in args.families.split(","):
    cfg = bench_config(family, args.vocab)
    for c in [int(x) for x in args.contexts.split(",")]:
      batch = make_batch(cfg, args.batch, c, args.response)
      time_it = c <= args.time_max_context
      res = {m: measure(cfg, m, batch, time_it, args.reps) for m in ("frozen", "full")}
      r = args.response
      line = {"bench": "step", "device": jax.devices()[0].platform, "family": family, "context": c,
              "response": r, "batch": args.batch, "vocab": args.vocab, "frozen": res["frozen"], "full": res["full"],
              "flop_ratio_full_over_frozen": res["full"]["flops"] / res["frozen"]["flops"],
              "temp_memory_ratio_full_over_frozen": res["full"]["temp_bytes"] / res["frozen"]["temp_bytes"],
              "flop_bound_6(C+R)/(C+6R)": 6 * (c + r) / (c + 6 * r)}
      if time_it:
        line["time_ratio_full_over_frozen"] = res["full"]["step_s"] / res["frozen"]["step_s"]
      print(json.dumps(line), flush=True)


# ---------------------------------------------------------------------------------------------
# Side by side: one variant per process.


def jax_variant(variant, args):
  cfg = bench_config("qwen3", args.vocab).replace(prefill_chunk=args.prefill_chunk)
  batch = make_batch(cfg, args.batch, args.context, args.response)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  if variant == "jax_full":
    opt, mode = optax.adamw(1e-5), "full"
  else:
    opt, mode = optim.apollo(1e-5, rank=256), "frozen"
  state = step_lib.init_train_state(params, opt)
  step = step_lib.make_train_step(cfg, "orpo", opt, mode, donate=False, objective_kwargs={"beta": 0.1})
  box = {}

  def run():  # the state is not donated: every call is the same first step
    box["loss"] = jax.block_until_ready(step(state, batch))[1]["loss"]

  first, median = timed(run, args.reps)
  return {"step_s": median, "first_step_s": first, "first_loss": float(box["loss"])}


def torch_variant(args):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from dreamjax.model import hf  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  cfg = bench_config("qwen3", args.vocab)
  with tempfile.TemporaryDirectory() as folder:
    hf.save_hf(folder, M.init_params(cfg, jax.random.PRNGKey(0)), cfg)  # the JAX variants' weights
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
  ctx, cho, rej = (torch.as_tensor(x) for x in make_tokens(cfg, args.batch, args.context, args.response))
  c, beta = args.context, 0.1
  ids = torch.cat([torch.cat([ctx, cho], 1), torch.cat([ctx, rej], 1)], 0)  # (2B, C + R): TRL's concatenated forward
  box = {}

  def step():
    logits = model(input_ids=ids).logits[:, :-1]  # every position, as TRL computes them
    labels = ids[:, 1:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0][:, c - 1:]  # response tokens
    mean = logp.mean(-1)
    chosen, rejected = mean[: args.batch], mean[args.batch:]
    nll = -logp[: args.batch].mean()
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    loss = nll - beta * torch.nn.functional.logsigmoid(log_odds).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    box.setdefault("loss", float(loss))  # the first step's: later ones follow the updates

  first, median = timed(step, args.reps)
  return {"step_s": median, "first_step_s": first, "first_loss": box["loss"], "torch": torch.__version__,
          "transformers": transformers.__version__, "attn_implementation": model.config._attn_implementation}  # pylint: disable=protected-access


def side_by_side(args):
  results = {}
  for variant in ("jax_full", "jax_frozen", "torch"):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--prefill_chunk", str(args.prefill_chunk),
           "--context", str(args.context),
           "--response", str(args.response), "--batch", str(args.batch), "--vocab", str(args.vocab),
           "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode == 3:  # torch or transformers missing
      results[variant] = {"skipped": out.stdout.strip().splitlines()[-1]}
      continue
    if out.returncode:
      results[variant] = {"failed": out.returncode, "stderr_tail": out.stderr[-600:]}
      continue
    results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
  line = {"bench": "step_side_by_side", "device": jax.devices()[0].platform, "cores": os.cpu_count(),
          "model": "qwen3 d256 L4 vocab %d" % args.vocab, "context": args.context, "response": args.response,
          "batch": args.batch, "prefill_chunk": args.prefill_chunk, **results}
  ref = results.get("torch", {})
  if "step_s" in ref:
    for v in ("jax_full", "jax_frozen"):
      if "step_s" in results.get(v, {}):
        line[f"{v}_speedup_vs_torch"] = round(ref["step_s"] / results[v]["step_s"], 2)
        line[f"{v}_memory_vs_torch"] = round(results[v]["peak_rss_gb"] / ref["peak_rss_gb"], 2)
        line[f"{v}_steady_memory_vs_torch"] = round(results[v]["steady_rss_gb"] / ref["steady_rss_gb"], 2)
  print(json.dumps(line), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--families", default="qwen3,qwen3_5")
  ap.add_argument("--contexts", default="512,2048,8192")
  ap.add_argument("--context", type=int, default=2048, help="--side_by_side: the context")
  ap.add_argument("--response", type=int, default=128)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--time_max_context", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--side_by_side", action="store_true")
  ap.add_argument("--prefill_chunk", type=int, default=M.ModelConfig.prefill_chunk,
                  help="--side_by_side: the frozen context's prefill chunk (ModelConfig.prefill_chunk)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # child process: one side-by-side variant
  args = ap.parse_args()
  if args.one:
    if args.one == "torch":
      try:
        import torch, transformers  # pylint: disable=g-import-not-at-top,multiple-imports,unused-import
      except ImportError as e:
        print(f"torch or transformers not installed ({e})")
        sys.exit(3)
      res = torch_variant(args)
    else:
      res = jax_variant(args.one, args)
    res["peak_rss_gb"] = round(max(_FIRST_PEAK[0], peak_rss_gb()), 3)  # the whole process: import, compile, steps
    res["steady_rss_gb"] = round(steady_rss_gb(), 3)  # the timed steps only (after the first)
    res["step_s"] = round(res["step_s"], 3)
    print(json.dumps(res), flush=True)
    return
  if args.side_by_side:
    side_by_side(args)
  else:
    frozen_vs_full(args)


if __name__ == "__main__":
  main()
