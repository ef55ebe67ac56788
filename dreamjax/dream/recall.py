"""The fast stage of the two-stage memory: experiences enter the memory file at once, and a
retrieval helper puts the memories most relevant to a prompt into that prompt.

    append_memory("mem.jsonl", Memory("m42", "The user wants PRs under 300 lines.", tags=("style",)))
    recall = Recall(load_graph("mem.jsonl"))
    hits = recall.top("Review this 900-line PR", k=3)          # [(Memory, score)], best first
    prompt = with_memories(prompt, memory_block(m for m, _ in hits))

Relevance is the cosine similarity of TF-IDF vectors over the words of a memory's text and tags
(Salton & Buckley 1988),

    tfidf(w, d) = tf(w, d) · (log((1 + N) / (1 + df(w))) + 1),   score(q, d) = cos(tfidf(q), tfidf(d))

or, when the query carries an embedding and every memory has one, the cosine of the embeddings.
Ties go to the newer memory (later in the file). The slow stage (weights) is
`dreamjax.dream.consolidate`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from dreamjax.data.jsonl import DataError
from dreamjax.dream.memory import Memory, MemoryGraph, parse_memory, read_memories
from dreamjax.data.jsonl import Message, Turns

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
DEFAULT_HEADER = "Relevant memories:"


def words(text: str) -> list[str]:
  """Returns the lower-cased word tokens of text (letters and digits; punctuation splits)."""
  return _WORD.findall(text.lower())


class Recall:
  """Ranks the memories of a graph by relevance to a query (see module docstring)."""

  def __init__(self, graph: MemoryGraph):
    self.graph = graph
    docs = [words(m.text) + [w for t in m.tags for w in words(t)] for m in graph.memories]
    self.vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    n = len(docs)
    tf_NxW = np.zeros((n, len(self.vocab)), np.float64)
    for i, d in enumerate(docs):
      for w in d:
        tf_NxW[i, self.vocab[w]] += 1.0
    df_W = (tf_NxW > 0).sum(axis=0)
    self.idf_W = np.log((1.0 + n) / (1.0 + df_W)) + 1.0
    self.doc_NxW = _unit_rows(tf_NxW * self.idf_W)
    embs = [m.embedding for m in graph.memories]
    self.emb_NxK = _unit_rows(np.asarray(embs, np.float64)) if embs and all(e is not None for e in embs) else None

  def scores(self, query: str, embedding: Optional[Sequence[float]] = None) -> np.ndarray:
    """Returns each memory's relevance to the query, [N] in [-1, 1] (0: nothing in common)."""
    if embedding is not None and self.emb_NxK is not None:
      q = np.asarray(embedding, np.float64)
      if q.shape != (self.emb_NxK.shape[1],):
        raise ValueError(f"Recall: query embedding has {q.size} numbers; the memories' have {self.emb_NxK.shape[1]}")
      return self.emb_NxK @ (q / max(np.linalg.norm(q), 1e-12))
    q_W = np.zeros(len(self.vocab), np.float64)
    for w in words(query):
      if w in self.vocab:
        q_W[self.vocab[w]] += 1.0
    q_W *= self.idf_W
    norm = np.linalg.norm(q_W)
    return self.doc_NxW @ (q_W / norm) if norm > 0 else np.zeros(len(self.graph))

  def top(self, query: str, k: int, *, exclude: Iterable[str] = (), embedding: Optional[Sequence[float]] = None,
          min_score: float = 1e-9) -> list[tuple[Memory, float]]:
    """Returns up to k (memory, score) pairs with score >= min_score, best first, skipping `exclude` ids."""
    if k <= 0:
      return []
    s = self.scores(query, embedding)
    skip = set(exclude)
    n = len(s)
    order = sorted(range(n), key=lambda i: (-s[i], -i))  # ties: the newer (later) memory first
    out = []
    for i in order:
      if len(out) == k or s[i] < min_score:
        break
      if self.graph.memories[i].id not in skip:
        out.append((self.graph.memories[i], float(s[i])))
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def memory_block(memories: Iterable[Memory], memory_format: str = "- {text}") -> str:
  """Returns the memories written one per line with memory_format ({text}, {id}, {tags}, {source})."""
  return "\n".join(memory_format.format(text=m.text, id=m.id, tags=", ".join(m.tags), source=m.source)
                   for m in memories)


def with_memories(prompt: Turns, block: str, header: str = DEFAULT_HEADER) -> Turns:
  """Returns the prompt with `header` + block in front: a plain prompt gets it prepended; a chat
  prompt gets it appended to its system message (a system message is added if there is none)."""
  if not block:
    return prompt
  text = f"{header}\n{block}" if header else block
  if isinstance(prompt, str):
    return f"{text}\n\n{prompt}"
  msgs: list[Message] = [dict(m) for m in prompt]
  if msgs and msgs[0].get("role") == "system":
    msgs[0]["content"] = f"{msgs[0]['content']}\n\n{text}"
  else:
    msgs.insert(0, {"role": "system", "content": text})
  return msgs


def append_memory(path: str, memory: Memory) -> None:
  """Appends one memory to a memory JSONL file (created if missing); nothing already there changes.

  The memory is validated as if read from the file (fields, unique id, links to known ids, the
  file's embedding size); a bad memory raises DataError naming the file and the line it would
  have taken, and the file is left as it was.
  """
  existing = read_memories(path) if os.path.exists(path) and os.path.getsize(path) > 0 else []
  with open(path, "a+b") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    last = b"\n"
    if size:
      f.seek(size - 1)
      last = f.read(1)
  lineno = _line_count(path) + 1
  where = f"{path}:{lineno}"
  obj = memory.to_json()
  mem = parse_memory(obj, where)
  ids = {m.id for m in existing}
  if mem.id in ids:
    raise DataError(f"{where}: field 'id' {mem.id!r} is already in {path}")
  for i, (other, _) in enumerate(mem.links):
    if other not in ids:
      raise DataError(f"{where}: field 'links[{i}]' names unknown memory {other!r}")
  dims = {len(m.embedding) for m in existing if m.embedding is not None}
  if mem.embedding is not None and dims and len(mem.embedding) not in dims:
    raise DataError(f"{where}: field 'embedding' has {len(mem.embedding)} numbers; the file's have {dims.pop()}")
  line = json.dumps(obj, ensure_ascii=False) + "\n"
  with open(path, "a", encoding="utf-8") as f:
    if last != b"\n":
      f.write("\n")
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def _line_count(path: str) -> int:
  with open(path, "rb") as f:
    return sum(1 for _ in f)
