"""Random walks over the memory graph, collisions of walks, and coverage.

A walk starts at a seed memory and takes `length` steps. At each step it restarts (jumps back to
its seed) with probability `restart_prob`; otherwise it moves to a neighbour j of the current
node i with probability

    p(j | i) = softmax_j(log w_ij / T) = w_ij^(1/T) / Σ_k w_ik^(1/T)

a softmax of the log edge weights at temperature T: T = 1 follows the weights, T → 0 takes the
heaviest edge, T → ∞ picks any neighbour uniformly; scaling every weight changes nothing. A node
without neighbours restarts.

A collision draws `n_walks` >= 2 walks whose seeds lie at least `min_distance` hops apart (BFS
distance; memories in different components are infinitely far) and joins their memories: the
scenario then combines memories the graph does not already associate. A `Walker` never returns
the same set of memories twice in a run, and reports coverage (fraction of memories and of tags
visited). Everything is reproducible from its `np.random.Generator`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, NamedTuple, Optional

import numpy as np

from dreamjax.dream.memory import MemoryGraph


@dataclasses.dataclass(frozen=True)
class WalkConfig:
  """How scenarios' walks are drawn."""

  length: int = 4  # steps per walk; a walk visits at most length + 1 memories
  restart_prob: float = 0.15  # chance per step of jumping back to the walk's seed
  temperature: float = 1.0  # T in p(j | i) ∝ w_ij^(1/T)
  n_walks: int = 2  # walks per scenario; 2 or more makes a collision
  min_distance: int = 3  # fewest hops between the seeds of colliding walks
  max_tries: int = 200  # draws before giving up on finding a new node set

  def __post_init__(self):
    if self.length < 0:
      raise ValueError(f"WalkConfig.length must be >= 0, got {self.length}")
    if not 0.0 <= self.restart_prob <= 1.0:
      raise ValueError(f"WalkConfig.restart_prob must be in [0, 1], got {self.restart_prob}")
    if not self.temperature > 0:
      raise ValueError(f"WalkConfig.temperature must be > 0, got {self.temperature}")
    if self.n_walks < 1:
      raise ValueError(f"WalkConfig.n_walks must be >= 1, got {self.n_walks}")
    if self.min_distance < 0 or self.max_tries < 1:
      raise ValueError(f"WalkConfig: min_distance must be >= 0 and max_tries >= 1, got {self.min_distance}, "
                       f"{self.max_tries}")


class Walk(NamedTuple):
  """One walk: node indices in the order visited (revisits and restarts included)."""

  start: int
  path: tuple[int, ...]


class Collision(NamedTuple):
  """The walks of one scenario (one walk, or several joined)."""

  walks: tuple[Walk, ...]

  @property
  def nodes(self) -> tuple[int, ...]:
    """Distinct nodes in first-visit order, walk after walk."""
    return tuple(dict.fromkeys(n for w in self.walks for n in w.path))

  @property
  def node_set(self) -> frozenset[int]:
    return frozenset(n for w in self.walks for n in w.path)


class Coverage(NamedTuple):
  """What fraction of the graph a set of walks visited."""

  nodes_visited: int
  nodes_total: int
  tags_visited: int
  tags_total: int

  @property
  def node_fraction(self) -> float:
    return self.nodes_visited / self.nodes_total if self.nodes_total else 0.0

  @property
  def tag_fraction(self) -> float:
    return self.tags_visited / self.tags_total if self.tags_total else 0.0

  def as_dict(self) -> dict:
    return {**self._asdict(), "node_fraction": self.node_fraction, "tag_fraction": self.tag_fraction}


class NoNewWalk(RuntimeError):
  """No walk with an unseen node set (or no seeds far enough apart) was found within max_tries."""


def transition_probs(weights: np.ndarray, temperature: float) -> np.ndarray:
  """Returns softmax(log w / T) over one node's edge weights (see module docstring)."""
  logits = np.log(weights) / temperature
  p = np.exp(logits - logits.max())
  return p / p.sum()


def bfs_distances(graph: MemoryGraph, source: int) -> np.ndarray:
  """Returns hop counts from `source` to every node; -1 where unreachable."""
  dist = np.full(len(graph), -1, np.int64)
  dist[source] = 0
  queue = collections.deque([source])
  while queue:
    i = queue.popleft()
    for j in graph.neighbors[i]:
      if dist[j] < 0:
        dist[j] = dist[i] + 1
        queue.append(j)
  return dist


def coverage(graph: MemoryGraph, visited: Iterable[int]) -> Coverage:
  """Returns the fraction of memories and of tags that `visited` node indices reach."""
  nodes = set(visited)
  tags = {t for i in nodes for t in graph.memories[i].tags}
  return Coverage(len(nodes), len(graph), len(tags), len(graph.tags))


class Walker:
  """Draws walks and collisions from one graph with one Generator; remembers what it drew.

  Args:
    graph: the memory graph.
    config: walk length, restart, temperature, collision size and seed spacing.
    rng: the source of every random choice (reproducible from its seed).
    seen: node sets (as frozensets of memory ids) not to return again, e.g. those of the triplets
      already written in this run; the walker adds each node set it returns.
    seed_weights: per-node weights (>= 0) for choosing walk seeds (default uniform); a
      consolidation schedule can favour recent or not-yet-consolidated memories.
  """

  def __init__(self, graph: MemoryGraph, config: WalkConfig, rng: np.random.Generator,
               seen: Optional[set] = None, seed_weights: Optional[np.ndarray] = None):
    if len(graph) == 0:
      raise ValueError("Walker: the memory graph is empty")
    self.graph, self.config, self.rng = graph, config, rng
    self.seen: set[frozenset[str]] = set() if seen is None else seen
    self.visited = np.zeros(len(graph), np.int64)  # times each node was visited in returned walks
    self._cum = [np.cumsum(transition_probs(w, config.temperature)) if len(w) else None for w in graph.weights]
    if seed_weights is None:
      self._seed_p = np.full(len(graph), 1.0 / len(graph))
    else:
      seed_weights = np.asarray(seed_weights, np.float64)
      if seed_weights.shape != (len(graph),) or (seed_weights < 0).any() or seed_weights.sum() <= 0:
        raise ValueError(f"Walker: seed_weights must be {len(graph)} non-negative numbers, not all 0")
      self._seed_p = seed_weights / seed_weights.sum()

  def step(self, node: int, start: int) -> int:
    """Returns the next node of a walk at `node` that started at `start`."""
    cum = self._cum[node]
    if cum is None or self.rng.random() < self.config.restart_prob:
      return start
    k = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
    return int(self.graph.neighbors[node][min(k, len(cum) - 1)])

  def walk(self, start: int) -> Walk:
    """Returns a walk of config.length steps from `start`."""
    path = [start]
    for _ in range(self.config.length):
      path.append(self.step(path[-1], start))
    return Walk(start, tuple(path))

  def seeds(self) -> Optional[list[int]]:
    """Returns n_walks seeds pairwise >= min_distance hops apart, or None if this draw failed."""
    first = int(self.rng.choice(len(self.graph), p=self._seed_p))
    seeds = [first]
    far = np.ones(len(self.graph), bool)
    for _ in range(1, self.config.n_walks):
      dist = bfs_distances(self.graph, seeds[-1])
      far &= (dist < 0) | (dist >= self.config.min_distance)
      far[seeds] = False
      p = np.where(far, self._seed_p, 0.0)
      if p.sum() <= 0:
        return None
      seeds.append(int(self.rng.choice(len(self.graph), p=p / p.sum())))
    return seeds

  def draw(self) -> Collision:
    """Returns a new collision (or single walk when n_walks == 1) whose node set was not seen.

    Raises NoNewWalk after config.max_tries draws without one.
    """
    for _ in range(self.config.max_tries):
      seeds = self.seeds()
      if seeds is None:
        continue
      collision = Collision(tuple(self.walk(s) for s in seeds))
      key = frozenset(self.graph.ids(collision.node_set))
      if key in self.seen:
        continue
      self.seen.add(key)
      for n in collision.nodes:
        self.visited[n] += 1
      return collision
    raise NoNewWalk(
        f"no new node set in {self.config.max_tries} draws ({len(self.graph)} memories, n_walks="
        f"{self.config.n_walks}, min_distance={self.config.min_distance}, {len(self.seen)} node sets seen); "
        f"lower min_distance, lengthen the walks or add memories")

  def coverage(self) -> Coverage:
    """Returns the coverage of every collision this walker has returned."""
    return coverage(self.graph, np.nonzero(self.visited)[0])
