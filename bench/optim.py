"""Optimizer-state bytes, update time and update compile time: APOLLO, APOLLO-Mini and optax.adamw.

Transformer-shaped parameters (d_model 1024, 8 layers, SwiGLU MLP 2816, vocab 32000 by default) in
the model's stacked layout (each layer parameter one leaf with a leading layer axis). Prints one
JSON line with the measured numbers and the ratios against AdamW. The compile time is the process
CPU seconds of XLA compiling the jitted `update` alone (tracing and lowering excluded); vary
--layers to see how it grows with depth.

    python bench/optim.py [--d_model 1024 --layers 8 --rank 256 --iters 20] [--projection constant]

--projection constant replaces APOLLO's Gaussian P (drawn again every step from its key) by a
constant matrix: a diagnostic that shows what the draw costs, not an optimizer to train with.
"""

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dreamjax import optim


def transformer_params(d_model, layers, ffn, vocab):
  """Returns zero params shaped like a dense decoder in dreamjax.model's stacked layout (names too)."""
  stack = lambda *shape: jnp.zeros((layers, *shape))
  return {"embed": jnp.zeros((vocab, d_model)),
          "layers": {"full_attention": {
              "attn": {k: stack(d_model, d_model) for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
              "mlp": {"gate_proj": stack(d_model, ffn), "up_proj": stack(d_model, ffn), "down_proj": stack(ffn, d_model)},
              "input_norm": stack(d_model), "post_attention_norm": stack(d_model)}},
          "final_norm": jnp.zeros((d_model,)), "lm_head": jnp.zeros((d_model, vocab))}


def only(tree, labels, label):
  """Returns the subtree of `tree` whose leaves carry `label` (paths kept: stacked leaves stay stacked)."""
  if isinstance(tree, dict):
    kept = {k: only(tree[k], labels[k], label) for k in tree}
    return {k: v for k, v in kept.items() if v is not None and not (isinstance(v, dict) and not v)}
  return tree if labels == label else None


def state_bytes(opt, params):
  """Bytes of the optimizer state for `params` (abstract: nothing is allocated)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(opt.init, params)))


def constant_projection(key, shape, rank, side):
  """P = 1/sqrt(rank) everywhere, in APOLLO's projection shape (the key is ignored)."""
  del key
  m, n = shape
  return jnp.full((rank, n) if side == "right" else (m, rank), rank ** -0.5, jnp.float32)


def compile_cpu_s(opt, params):
  """Process CPU seconds (user + system) of XLA compiling jit(opt.update) for `params`."""
  state = opt.init(params)
  lowered = jax.jit(opt.update).trace(params, state, params).lower()
  usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
  t0 = usage()
  lowered.compile()
  return usage() - t0


def time_update(opt, params, iters):
  state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
  update = jax.jit(opt.update)
  u, state = update(grads, state, params)
  jax.block_until_ready(u)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    u, state = update(grads, state, params)
    jax.block_until_ready(u)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--d_model", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--ffn", type=int, default=2816)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--rank", type=int, default=256)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--projection", choices=("gaussian", "constant"), default="gaussian")
  args = ap.parse_args()
  params = transformer_params(args.d_model, args.layers, args.ffn, args.vocab)
  projected = only(params, optim.default_label_fn(params), "apollo")
  per_matrix = lambda r: sum(2 * r * max(p.shape[-2:]) * 4 * p.shape[0] for p in jax.tree.leaves(projected))
  expected_apollo, expected_mini = per_matrix(args.rank), per_matrix(1)  # float32 moments, per stacked matrix
  proj = {} if args.projection == "gaussian" else {"projection_fn": constant_projection}
  opts = {
      "adamw": optax.adamw(1e-3),
      "apollo": optim.apollo(1e-3, rank=args.rank, **proj),
      "apollo_mini": optim.apollo_mini(1e-3, **proj),
  }
  out = {"device": jax.devices()[0].platform, "d_model": args.d_model, "layers": args.layers,
         "rank": args.rank, "projection": args.projection,
         "param_count": int(sum(p.size for p in jax.tree.leaves(params))),
         "projected_param_count": int(sum(p.size for p in jax.tree.leaves(projected)))}
  compile_cpu_s(optax.sgd(1e-3), {"w": jnp.zeros((3, 5))})  # backend start-up, outside the figures
  for name, opt in opts.items():
    out[f"{name}_update_compile_cpu_s"] = compile_cpu_s(opt, params)
    out[f"{name}_state_bytes"] = state_bytes(opt, params)
    # Projected leaves alone (all labelled 'apollo'): moments plus the O(1) per-leaf scalars.
    out[f"{name}_projected_state_bytes"] = state_bytes(opt, projected)
    out[f"{name}_update_s"] = time_update(opt, params, args.iters)
  out["apollo_projected_state_expected_bytes"] = expected_apollo
  out["apollo_mini_projected_state_expected_bytes"] = expected_mini
  # The limiter scalar, the raw key and the count are the O(1) extras per projected leaf.
  out["apollo_projected_extra_bytes"] = out["apollo_projected_state_bytes"] - expected_apollo
  adam_proj = out["adamw_projected_state_bytes"]
  out["ratio_apollo_vs_adamw_projected"] = out["apollo_projected_state_bytes"] / adam_proj
  out["ratio_apollo_mini_vs_adamw_projected"] = out["apollo_mini_projected_state_bytes"] / adam_proj
  out["ratio_apollo_vs_adamw_total"] = out["apollo_state_bytes"] / out["adamw_state_bytes"]
  out["ratio_apollo_mini_vs_adamw_total"] = out["apollo_mini_state_bytes"] / out["adamw_state_bytes"]
  out["ratio_apollo_update_time_vs_adamw"] = out["apollo_update_s"] / out["adamw_update_s"]
  out["ratio_apollo_mini_update_time_vs_adamw"] = out["apollo_mini_update_s"] / out["adamw_update_s"]
  for name in ("apollo", "apollo_mini"):
    out[f"ratio_{name}_update_compile_vs_adamw"] = (out[f"{name}_update_compile_cpu_s"]
                                                    / out["adamw_update_compile_cpu_s"])
  out["target_mini_le_1_over_100"] = out["ratio_apollo_mini_vs_adamw_projected"] <= 0.01
  print(json.dumps(out))


if __name__ == "__main__":
  main()
