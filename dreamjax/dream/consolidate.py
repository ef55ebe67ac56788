"""The slow stage of the two-stage memory: a consolidation schedule turns new memories into weights.

A memory is *fresh* for `replay_cycles` dream cycles after it first appears in the memory graph,
then *consolidated*. Each cycle the walk seeds are drawn so that fresh memories take
`fresh_share` of the seed probability (split by age with a per-cycle decay) and consolidated
memories the rest, uniformly: interleaved replay of older memories, the complementary-learning-
systems recipe (McClelland, McNaughton & O'Reilly 1995) of hippocampal replay interleaved with
old experience. For a memory of age a = cycle − first_cycle:

    u(a) = decay^a                         fresh (a < replay_cycles)
    p(m) = fresh_share · u(a_m) / Σ_fresh u             for fresh m
    p(m) = (1 − fresh_share) / |consolidated|           for consolidated m

(when one group is empty the other takes all the mass). `replay_cycles = 0` turns the schedule
off (uniform seeds). The first cycle at which the run saw each memory is kept in a small ledger,
RUN/memory_ledger.json, so a resumed run and later cycles age memories consistently; memories
added to the memory file between cycles enter at their first cycle (the fast stage) and are
replayed from then on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

from dreamjax.dream.memory import MemoryGraph


@dataclasses.dataclass(frozen=True)
class ConsolidationSchedule:
  """How long and how strongly new memories are replayed (see module docstring)."""

  replay_cycles: int = 3  # cycles a memory stays fresh; 0: no schedule (uniform walk seeds)
  decay: float = 0.5  # fresh weight multiplier per cycle of age, in (0, 1]
  fresh_share: float = 0.75  # share of walk seeds on fresh memories; the rest replays older ones

  def __post_init__(self):
    if self.replay_cycles < 0:
      raise ValueError(f"replay_cycles must be >= 0, got {self.replay_cycles}")
    if not 0.0 < self.decay <= 1.0:
      raise ValueError(f"decay must be in (0, 1], got {self.decay}")
    if not 0.0 <= self.fresh_share <= 1.0:
      raise ValueError(f"fresh_share must be in [0, 1], got {self.fresh_share}")

  def seed_weights(self, ages_N: np.ndarray) -> np.ndarray:
    """Returns the walk-seed probabilities [N] of memories of the given ages (cycles, >= 0)."""
    ages_N = np.asarray(ages_N, np.int64)
    n = ages_N.shape[0]
    if n == 0:
      return np.zeros(0)
    if self.replay_cycles == 0:
      return np.full(n, 1.0 / n)
    fresh = ages_N < self.replay_cycles
    u = np.where(fresh, self.decay ** np.minimum(ages_N, self.replay_cycles).astype(np.float64), 0.0)
    n_old = int((~fresh).sum())
    share = self.fresh_share if (fresh.any() and n_old) else float(fresh.any())
    p = np.zeros(n)
    if fresh.any():
      p[fresh] = share * u[fresh] / u[fresh].sum()
    if n_old:
      p[~fresh] = (1.0 - share) / n_old
    return p


class Ledger:
  """The first cycle at which a run saw each memory id, kept in a JSON file (written atomically)."""

  def __init__(self, path: str):
    self.path = path
    self.first_cycle: dict[str, int] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        try:
          data = json.load(f)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: malformed JSON ({e}); it records when each memory entered the run") from None
      if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected an object {{memory id: first cycle (int)}}")
      self.first_cycle = dict(data)

  def observe(self, graph: MemoryGraph, cycle: int) -> np.ndarray:
    """Records memories seen for the first time at `cycle`, saves, and returns their ages [N]."""
    new = {m.id: cycle for m in graph.memories if m.id not in self.first_cycle}
    if new:
      self.first_cycle.update(new)
      self._save()
    return np.asarray([max(0, cycle - self.first_cycle[m.id]) for m in graph.memories], np.int64)

  def _save(self) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.first_cycle, f, indent=0, sort_keys=True)
    os.replace(tmp, self.path)


def summary(ages_N: np.ndarray, schedule: ConsolidationSchedule, p_N: np.ndarray) -> Mapping[str, float]:
  """Returns the cycle's consolidation figures: fresh/consolidated counts and the fresh seed share."""
  fresh = np.asarray(ages_N) < schedule.replay_cycles if schedule.replay_cycles else np.ones(len(ages_N), bool)
  return {"fresh": int(fresh.sum()), "consolidated": int((~fresh).sum()),
          "fresh_seed_share": float(np.asarray(p_N)[fresh].sum()) if len(p_N) else 0.0}
