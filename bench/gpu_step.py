"""Frozen ORPO step of a 1B-class model at context 8K on one accelerator: tokens/s and MFU.

    python bench/gpu_step.py [--context 8192] [--response 512] [--batch 4] [--peak_tflops N]

Qwen3-1.7B's shapes (random weights, bf16 params and compute, float32 APOLLO-Mini moments), one
device, the context-frozen ORPO step of launch.train (remat on). Prints one JSON line: median step
time, tokens/s (context + chosen + rejected tokens per second) and model FLOPs utilisation

    MFU = model FLOPs per step / step time / the chip's peak dense bf16 FLOP/s

with model FLOPs counted from the shapes (matmuls and attention, the causal half; written out in
`model_flops`), since XLA's cost analysis counts a loop body once whatever its trip count (it is
printed beside, `xla_cost_analysis_flops`). The peak comes from the device kind (H100/H200 SXM:
989 TFLOP/s dense bf16; A100: 312) or --peak_tflops. For a GPU/TPU; on a CPU it runs (slowly) and
reports no MFU. Never part of CI.
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def qwen3_1_7b() -> M.ModelConfig:
  """Qwen3-1.7B's shapes (values of its published config.json)."""
  return M.ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, tie_embeddings=True)


def model_flops(cfg: M.ModelConfig, b: int, c: int, r: int) -> float:
  """Returns the FLOPs of one frozen step: forward over the context, forward + backward over 2 responses.

    matmul FLOPs per token   = 2 · (weights a token multiplies)        (forward; backward: 2× that)
    attention per query      = 4 · H · hd · (keys it sees)             (QKᵀ and PV; causal: half)
    prefill:  B · C tokens, forward only, no LM head
    response: 2B rows of R tokens, forward + backward (3×), LM head included, attending C + R/2 keys
  """
  d, f, h, kv, hd, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
  per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f  # q, o; k, v; gate, up, down
  head = d * cfg.vocab_size
  prefill = 2 * b * c * L * per_layer + L * 4 * h * hd * b * c * c / 2
  response = 3 * (2 * 2 * b * r * (L * per_layer + head) + L * 4 * h * hd * 2 * b * r * (c + r / 2))
  return prefill + response


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--context", type=int, default=8192)
  ap.add_argument("--response", type=int, default=512)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's dense bf16 peak (default: by kind)")
  ap.add_argument("--layers", type=int, default=0, help="fewer layers, for a quick check (0: the model's 28)")
  args = ap.parse_args()
  cfg = qwen3_1_7b()
  if args.layers:
    cfg = cfg.replace(num_layers=args.layers, layer_types=())
  b, c, r = args.batch, args.context, args.response
  rng = np.random.default_rng(0)
  exs = [batch_lib.TokenizedExample(*(rng.integers(3, cfg.vocab_size, n).tolist() for n in (c, r, r))) for _ in range(b)]
  batch = batch_lib.collate(exs, c, r)
  params = M.init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
  opt = optim.apollo_mini(1e-5, mu_dtype=jnp.float32)
  state = step_lib.init_train_state(params, opt)
  step = step_lib.make_train_step(cfg, "orpo", opt, "frozen", remat=True)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, _ = compiled(state, batch)  # warm-up (donates the state)
  jax.block_until_ready(state)
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  dev = jax.devices()[0]
  peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in dev.device_kind), 0.0)
  flops = model_flops(cfg, b, c, r)
  out = {"bench": "gpu_step", "device": dev.device_kind, "platform": dev.platform, "model": f"Qwen3-1.7B shapes, {cfg.num_layers} layers",
         "context": c, "response": r, "batch": b, "step_s": round(step_s, 4), "compile_s": round(compile_s, 1),
         "tokens_per_s": round(b * (c + 2 * r) / step_s), "model_flops": flops,
         "xla_cost_analysis_flops": float(cost.get("flops", float("nan"))), "peak_tflops": peak,
         "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None,
         "loss": float(metrics["loss"]), "attention_impl": cfg.attention_impl}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
