"""Cached generation vs recomputing the full sequence for every new token (tiny model, CPU).

    python bench/sample.py [--model qwen3_5-tiny] [--prompt 256] [--new 256]

Prints one JSON line: tokens/s of both and the ratio (target >= 10x).
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from dreamjax import model as M
from dreamjax.model import sample


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="qwen3_5-tiny")
  ap.add_argument("--prompt", type=int, default=256)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--batch", type=int, default=1)
  args = ap.parse_args()
  cfg = M.ModelConfig.preset(args.model)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  prompt = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.prompt), 3, cfg.vocab_size)
  ones = jnp.ones_like(prompt)

  gen = lambda: sample.generate(params, cfg, (prompt, ones), args.new, stop_tokens=[-1])
  jax.block_until_ready(gen())  # compile
  t0 = time.perf_counter()
  out = jax.block_until_ready(gen())
  cached_s = time.perf_counter() - t0

  # Baseline: a jitted full forward over a fixed-size buffer (one compile), recomputed per token.
  total = args.prompt + args.new
  fwd = jax.jit(functools.partial(M.forward, config=cfg))

  def recompute():
    buf = jnp.zeros((args.batch, total), jnp.int32).at[:, : args.prompt].set(prompt)
    for i in range(args.new):
      n = args.prompt + i
      mask = (jnp.arange(total) < n).astype(jnp.int32)[None].repeat(args.batch, 0)
      logits = fwd(params, buf, M.positions_from_mask(mask), mask).logits
      buf = buf.at[:, n].set(jnp.argmax(logits[:, n - 1], -1))
    return buf

  jax.block_until_ready(fwd(params, jnp.zeros((args.batch, total), jnp.int32), jnp.zeros((args.batch, total), jnp.int32),
                            jnp.ones((args.batch, total), jnp.int32)))
  t0 = time.perf_counter()
  buf = jax.block_until_ready(recompute())
  full_s = time.perf_counter() - t0
  same = bool(jnp.array_equal(buf[:, args.prompt:], out.tokens_BxN))
  new_tokens = args.batch * args.new
  print(json.dumps({
      "bench": "sample", "device": jax.devices()[0].platform, "model": args.model, "prompt": args.prompt,
      "new_tokens": args.new, "batch": args.batch, "cached_tokens_per_s": new_tokens / cached_s,
      "recompute_tokens_per_s": new_tokens / full_s, "ratio": full_s / cached_s,
      "greedy_outputs_identical": same, "target_ratio": 10.0,
  }))


if __name__ == "__main__":
  main()
