"""The data-scale defence: every batch mixes preference examples with ~25% general replay.

`Mixer` walks the preference examples once per epoch in a seeded order (one pass by default:
never repeat) and fills `round(batch_size · general_ratio)` slots of every batch with general
examples, cycling through those in a fresh seeded order whenever they run out. Its whole position
is a few integers (`MixerPosition`), saved with the checkpoint, so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Generic, Optional, Sequence, TypeVar

import numpy as np

P = TypeVar("P")
G = TypeVar("G")


@dataclasses.dataclass(frozen=True)
class MixerPosition:
  """Where the mixer is; everything else is derived from the seed."""

  epoch: int = 0  # preference epoch (0-based)
  pref_index: int = 0  # next preference example within the epoch's order
  general_cycle: int = 0  # how many times the general data has been cycled
  general_index: int = 0  # next general example within the cycle's order
  batches: int = 0  # batches produced so far

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "MixerPosition":
    return cls(**{k: int(v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class MixedBatch(Generic[P, G]):
  """One batch: its preference examples and its general (replay) examples."""

  preference: list
  general: list
  position: MixerPosition  # position *after* this batch (save this with the step's state)


def _order(n: int, seed: int, stream: int, cycle: int, shuffle: bool) -> np.ndarray:
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, stream, cycle]).permutation(n)


class Mixer(Generic[P, G]):
  """Yields mixed batches: (1 - general_ratio) preference, general_ratio replay, per batch.

  fill_last: an epoch's last, short batch gets extra general examples up to batch_size (the dream
  cycle's batches keep one shape); without it the batch is short and the caller decides.
  pref_stream: the seed stream of the preference order (np.random.default_rng([seed, stream,
  epoch])); the general order uses stream 1.
  """

  def __init__(
      self,
      preference: Sequence[P],
      general: Sequence[G] = (),
      batch_size: int = 8,
      general_ratio: float = 0.25,
      epochs: int = 1,
      seed: int = 0,
      shuffle: bool = True,
      position: Optional[MixerPosition] = None,
      fill_last: bool = False,
      pref_stream: int = 0,
  ):
    if not 0.0 <= general_ratio < 1.0:
      raise ValueError(f"general_ratio must be in [0, 1), got {general_ratio}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 1:
      raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not preference:
      raise ValueError("Mixer needs at least one preference example")
    self.n_general = int(round(batch_size * general_ratio)) if general else 0
    if general_ratio > 0 and general and self.n_general == 0:
      raise ValueError(
          f"batch_size {batch_size} × general_ratio {general_ratio} rounds to 0 general examples per batch; "
          "raise the batch size or the ratio"
      )
    self.n_pref = batch_size - self.n_general
    if self.n_pref < 1:
      raise ValueError(f"batch_size {batch_size} leaves no room for preference examples")
    self.preference, self.general = list(preference), list(general)
    self.epochs, self.seed, self.shuffle = epochs, seed, shuffle
    self.fill_last, self.pref_stream = fill_last, pref_stream
    self.batch_size = batch_size
    self.position = position or MixerPosition()

  def batches_per_epoch(self) -> int:
    """Returns the number of batches one epoch of preference data makes (last one may be short)."""
    return -(-len(self.preference) // self.n_pref)

  def total_batches(self) -> int:
    return self.batches_per_epoch() * self.epochs

  def __iter__(self):
    return self

  def __next__(self) -> MixedBatch:
    pos = self.position
    if pos.epoch >= self.epochs:
      raise StopIteration
    order = _order(len(self.preference), self.seed, self.pref_stream, pos.epoch, self.shuffle)
    idx = order[pos.pref_index : pos.pref_index + self.n_pref]
    pref = [self.preference[i] for i in idx]
    pref_index, epoch = pos.pref_index + len(idx), pos.epoch
    if pref_index >= len(self.preference):
      pref_index, epoch = 0, epoch + 1
    n_general = self.n_general
    if self.fill_last and self.general:  # a short last batch: extra replay keeps the batch shape
      n_general = self.batch_size - len(pref)
    general, g_cycle, g_index = [], pos.general_cycle, pos.general_index
    while len(general) < n_general:
      g_order = _order(len(self.general), self.seed, 1, g_cycle, self.shuffle)
      take = g_order[g_index : g_index + n_general - len(general)]
      general.extend(self.general[i] for i in take)
      g_index += len(take)
      if g_index >= len(self.general):
        g_cycle, g_index = g_cycle + 1, 0
    self.position = MixerPosition(epoch, pref_index, g_cycle, g_index, pos.batches + 1)
    return MixedBatch(pref, general, self.position)


def hold_out(examples: Sequence, n: int, rng: np.random.Generator) -> tuple[list, list]:
  """Returns (held_out, rest): n examples drawn by one permutation from rng, and the others in
  their original order (the monitors' held-out split, never trained on)."""
  idx = rng.permutation(len(examples))
  return [examples[i] for i in idx[:n]], [examples[i] for i in sorted(idx[n:])]
