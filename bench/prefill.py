"""Chunked (parallel WY form) vs recurrent (token scan) Gated DeltaNet prefill at 2048 tokens.

    python bench/prefill.py [--tokens 2048] [--heads 4] [--dk 64] [--dv 64]

Prints one JSON line with the median times (forward, and forward+backward), the speed ratios and
the max output difference.
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dreamjax.model import deltanet


def timeit(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--dk", type=int, default=64)
  ap.add_argument("--dv", type=int, default=64)
  ap.add_argument("--chunk", type=int, default=64)
  args = ap.parse_args()
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  shape = (args.batch, args.tokens, args.heads)
  q = jax.random.normal(ks[0], shape + (args.dk,))
  k = jax.random.normal(ks[1], shape + (args.dk,))
  v = jax.random.normal(ks[2], shape + (args.dv,))
  g = -jax.nn.softplus(jax.random.normal(ks[3], shape))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], shape))
  chunked = jax.jit(functools.partial(deltanet.chunked_delta_rule, chunk_size=args.chunk))
  recurrent = jax.jit(deltanet.recurrent_delta_rule)
  t_c = timeit(chunked, q, k, v, g, beta)
  t_r = timeit(recurrent, q, k, v, g, beta)
  diff = float(jnp.max(jnp.abs(chunked(q, k, v, g, beta)[0] - recurrent(q, k, v, g, beta)[0])))
  # Training cost too: the backward of the token scan keeps every state (T × B·H·dk·dv floats),
  # the chunked form one per chunk.
  w = jax.random.normal(jax.random.PRNGKey(1), shape + (args.dv,))
  grad = lambda f: jax.jit(jax.grad(lambda *xs: jnp.sum(f(*xs)[0] * w), argnums=(0, 1, 2, 3, 4)))
  t_cg = timeit(grad(chunked), q, k, v, g, beta)
  t_rg = timeit(grad(recurrent), q, k, v, g, beta)
  print(json.dumps({
      "bench": "deltanet_prefill", "device": jax.devices()[0].platform, "tokens": args.tokens,
      "batch": args.batch, "heads": args.heads, "dk": args.dk, "dv": args.dv, "chunk": args.chunk,
      "chunked_s": t_c, "recurrent_s": t_r, "speedup_chunked_vs_recurrent": t_r / t_c,
      "max_abs_diff": diff, "chunked_grad_s": t_cg, "recurrent_grad_s": t_rg,
      "grad_speedup_chunked_vs_recurrent": t_rg / t_cg,
  }))


if __name__ == "__main__":
  main()
