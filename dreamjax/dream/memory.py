"""The memory graph: memories (nodes) and weighted links between them (edges), from JSONL.

One memory per line:

    {"id": "m01", "text": "...", "tags": ["tests", "style"], "links": ["m02", {"id": "m07", "weight": 2}],
     "embedding": [0.1, -0.3, ...], "timestamp": "2025-03-01T12:00:00" | 1740830400, "source": "chat",
     "meta": {...}}

Only `id` and `text` are required. An edge joins two memories with weight

    w_ij = tag_weight · |usable tags shared| + link_weight · (sum of explicit link weights, either way)
         + similarity_weight · cos(e_i, e_j)      (the last only where cos >= min_similarity)

Edges are undirected (an association works both ways) and only pairs with w_ij > 0 are edges. A
bad line raises `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import tempfile
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from dreamjax.data import jsonl
from dreamjax.data.jsonl import DataError

Timestamp = Union[str, float, int]

_FIELDS = ("id", "text", "tags", "links", "embedding", "timestamp", "source", "meta")


@dataclasses.dataclass(frozen=True)
class Memory:
  """One memory: a node of the graph."""

  id: str  # unique within a graph
  text: str  # what the memory says; scenarios quote it
  tags: tuple[str, ...] = ()  # topics; memories sharing a tag are linked
  links: tuple[tuple[str, float], ...] = ()  # explicit links: (other memory id, weight > 0)
  embedding: Optional[tuple[float, ...]] = None  # optional vector; similar memories are linked
  timestamp: Optional[Timestamp] = None  # ISO 8601 string or seconds since the epoch
  source: str = ""  # where the memory came from (a conversation, a log, a file)
  meta: Optional[dict] = None  # free-form extras, carried through load and save

  def to_json(self) -> dict[str, Any]:
    """Returns the JSONL object of this memory (fields at their defaults left out)."""
    out: dict[str, Any] = {"id": self.id, "text": self.text}
    if self.tags:
      out["tags"] = list(self.tags)
    if self.links:
      out["links"] = [i if w == 1.0 else {"id": i, "weight": w} for i, w in self.links]
    if self.embedding is not None:
      out["embedding"] = list(self.embedding)
    if self.timestamp is not None:
      out["timestamp"] = self.timestamp
    if self.source:
      out["source"] = self.source
    if self.meta is not None:
      out["meta"] = self.meta
    return out


@dataclasses.dataclass(frozen=True)
class EdgeConfig:
  """How memories are linked; see the module docstring for the weight."""

  tag_weight: float = 1.0  # per shared tag
  link_weight: float = 2.0  # times the weight of an explicit link
  similarity_weight: float = 1.0  # times the cosine similarity of the embeddings
  min_similarity: float = 0.5  # cosine below this makes no similarity edge
  max_tag_nodes: Optional[int] = None  # a tag on more memories than this is too generic to link them


# --------------------------------------------------------------------------------------------------
# JSONL


def check_keys(obj: Any, where: str, allowed: Sequence[str], required: Sequence[str], what: str) -> dict:
  """Returns obj if it is a JSON object with the required keys and no others; else DataError."""
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object ({what}); got {type(obj).__name__}")
  for key in required:
    if key not in obj:
      raise DataError(f"{where}: missing field '{key}'; a {what} needs {', '.join(required)}")
  unknown = sorted(set(obj) - set(allowed))
  if unknown:
    raise DataError(f"{where}: unknown field '{unknown[0]}'; a {what} has fields {', '.join(allowed)}")
  return obj


def _number(value: Any, where: str, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise DataError(f"{where}: field '{field}' must be a finite number, got {value!r}")
  return float(value)


def _string(value: Any, where: str, field: str, nonempty: bool = True) -> str:
  if not isinstance(value, str):
    raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
  if nonempty and not value.strip():
    raise DataError(f"{where}: field '{field}' is empty")
  return value


def parse_memory(obj: Any, where: str) -> Memory:
  """Returns a validated Memory from one decoded JSON line (links not yet checked against ids)."""
  check_keys(obj, where, _FIELDS, ("id", "text"), "memory")
  mem_id = _string(obj["id"], where, "id")
  text = _string(obj["text"], where, "text")
  tags = obj.get("tags", [])
  if not isinstance(tags, list):
    raise DataError(f"{where}: field 'tags' must be a list of strings, got {type(tags).__name__}")
  tags = tuple(_string(t, where, f"tags[{i}]") for i, t in enumerate(tags))
  links_raw = obj.get("links", [])
  if not isinstance(links_raw, list):
    raise DataError(f"{where}: field 'links' must be a list of ids or {{id, weight}}, got {type(links_raw).__name__}")
  links = []
  for i, link in enumerate(links_raw):
    field = f"links[{i}]"
    if isinstance(link, str):
      links.append((_string(link, where, field), 1.0))
      continue
    check_keys(link, f"{where}: field '{field}'", ("id", "weight"), ("id",), "link")
    weight = _number(link.get("weight", 1.0), where, f"{field}.weight")
    if weight <= 0:
      raise DataError(f"{where}: field '{field}.weight' must be > 0, got {weight}")
    links.append((_string(link["id"], where, f"{field}.id"), weight))
  for other, _ in links:
    if other == mem_id:
      raise DataError(f"{where}: field 'links' links memory {mem_id!r} to itself")
  embedding = obj.get("embedding")
  if embedding is not None:
    if not isinstance(embedding, list) or not embedding:
      raise DataError(f"{where}: field 'embedding' must be a non-empty list of numbers")
    embedding = tuple(_number(x, where, f"embedding[{i}]") for i, x in enumerate(embedding))
    if not any(embedding):
      raise DataError(f"{where}: field 'embedding' is all zeros (no direction to compare)")
  timestamp = obj.get("timestamp")
  if timestamp is not None:
    if isinstance(timestamp, str):
      try:
        datetime.datetime.fromisoformat(timestamp)
      except ValueError:
        raise DataError(f"{where}: field 'timestamp' {timestamp!r} is not an ISO 8601 date-time") from None
    else:
      _number(timestamp, where, "timestamp")
  source = _string(obj.get("source", ""), where, "source", nonempty=False)
  meta = obj.get("meta")
  if meta is not None and not isinstance(meta, dict):
    raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
  return Memory(mem_id, text, tags, tuple(links), embedding, timestamp, source, meta)


def read_memories(path: str) -> list[Memory]:
  """Returns the validated memories of a JSONL file (unique ids, links to known ids, one embedding size)."""
  memories, line_of = [], {}
  for where, obj in jsonl.read_objects(path):
    mem = parse_memory(obj, where)
    if mem.id in line_of:
      raise DataError(f"{where}: field 'id' {mem.id!r} repeats the memory at {line_of[mem.id]}")
    line_of[mem.id] = where
    memories.append(mem)
  if not memories:
    raise DataError(f"{path}: no memories (file is empty)")
  dim = None
  for mem in memories:
    where = line_of[mem.id]
    for i, (other, _) in enumerate(mem.links):
      if other not in line_of:
        raise DataError(f"{where}: field 'links[{i}]' names unknown memory {other!r}")
    if mem.embedding is not None:
      if dim is None:
        dim, first = len(mem.embedding), where
      elif len(mem.embedding) != dim:
        raise DataError(
            f"{where}: field 'embedding' has {len(mem.embedding)} numbers; the first embedding ({first}) has {dim}")
  return memories


def write_memories(path: str, memories: Iterable[Memory]) -> None:
  """Writes memories as JSONL, atomically (a temporary file renamed over `path`)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".memories-", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for mem in memories:
        f.write(json.dumps(mem.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# --------------------------------------------------------------------------------------------------
# The graph


@dataclasses.dataclass(frozen=True, eq=False)
class MemoryGraph:
  """Memories and their weighted, undirected edges as adjacency lists (node i ↔ memories[i])."""

  memories: tuple[Memory, ...]
  neighbors: tuple[np.ndarray, ...]  # per node: int64 indices of its neighbours, ascending
  weights: tuple[np.ndarray, ...]  # per node: float64 edge weights (> 0), aligned with neighbors
  edge_config: EdgeConfig = EdgeConfig()

  def __post_init__(self):
    object.__setattr__(self, "_index", {m.id: i for i, m in enumerate(self.memories)})

  def __len__(self) -> int:
    return len(self.memories)

  def __contains__(self, mem_id: str) -> bool:
    return mem_id in self._index

  def index(self, mem_id: str) -> int:
    """Returns the node index of a memory id."""
    try:
      return self._index[mem_id]
    except KeyError:
      raise KeyError(f"no memory with id {mem_id!r} in the graph") from None

  def ids(self, nodes: Iterable[int]) -> tuple[str, ...]:
    """Returns the memory ids of node indices."""
    return tuple(self.memories[i].id for i in nodes)

  @property
  def tags(self) -> frozenset[str]:
    """Every tag of every memory."""
    return frozenset(t for m in self.memories for t in m.tags)

  def weight(self, i: int, j: int) -> float:
    """Returns the weight of edge i–j (0 when there is none)."""
    k = np.searchsorted(self.neighbors[i], j)
    return float(self.weights[i][k]) if k < len(self.neighbors[i]) and self.neighbors[i][k] == j else 0.0

  def edges(self) -> list[tuple[str, str, float]]:
    """Returns each undirected edge once, as (id, id, weight) with the lower node index first."""
    return [(self.memories[i].id, self.memories[j].id, float(w))
            for i in range(len(self)) for j, w in zip(self.neighbors[i], self.weights[i]) if i < j]

  def with_memories(self, new: Iterable[Memory]) -> "MemoryGraph":
    """Returns a graph with `new` memories added (the fast stage: new experiences enter at once)."""
    return build_graph(list(self.memories) + list(new), self.edge_config)


def build_graph(memories: Sequence[Memory], edge_config: EdgeConfig = EdgeConfig()) -> MemoryGraph:
  """Returns the graph of `memories` with the edges `edge_config` describes."""
  n = len(memories)
  index = {}
  for i, m in enumerate(memories):
    if m.id in index:
      raise ValueError(f"memory id {m.id!r} appears twice (nodes {index[m.id]} and {i})")
    index[m.id] = i
  adj: list[dict[int, float]] = [dict() for _ in range(n)]

  def add(i, j, w):
    if w > 0:
      adj[i][j] = adj[i].get(j, 0.0) + w
      adj[j][i] = adj[j].get(i, 0.0) + w

  by_tag: dict[str, list[int]] = {}
  for i, m in enumerate(memories):
    for t in set(m.tags):
      by_tag.setdefault(t, []).append(i)
  for nodes in by_tag.values():
    if edge_config.max_tag_nodes is not None and len(nodes) > edge_config.max_tag_nodes:
      continue
    for a in range(len(nodes)):
      for b in range(a + 1, len(nodes)):
        add(nodes[a], nodes[b], edge_config.tag_weight)
  for i, m in enumerate(memories):
    for other, w in m.links:
      if other not in index:
        raise ValueError(f"memory {m.id!r} links to unknown memory {other!r}")
      add(i, index[other], edge_config.link_weight * w)
  with_emb = [i for i, m in enumerate(memories) if m.embedding is not None]
  if len(with_emb) > 1 and edge_config.similarity_weight > 0:
    emb_ExK = np.asarray([memories[i].embedding for i in with_emb], np.float64)
    emb_ExK /= np.linalg.norm(emb_ExK, axis=1, keepdims=True)
    for a, i in enumerate(with_emb):
      sims_E = emb_ExK[a + 1:] @ emb_ExK[a]  # one row at a time: O(E) memory
      for b in np.nonzero(sims_E >= edge_config.min_similarity)[0]:
        add(i, with_emb[a + 1 + b], edge_config.similarity_weight * float(sims_E[b]))
  neighbors, weights = [], []
  for row in adj:
    order = sorted(row)
    neighbors.append(np.asarray(order, np.int64))
    weights.append(np.asarray([row[j] for j in order], np.float64))
  return MemoryGraph(tuple(memories), tuple(neighbors), tuple(weights), edge_config)


def load_graph(path: str, edge_config: EdgeConfig = EdgeConfig()) -> MemoryGraph:
  """Returns the memory graph of a JSONL file of memories (see module docstring)."""
  return build_graph(read_memories(path), edge_config)
