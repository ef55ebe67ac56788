"""JSON for the simulations' results: plain data from numpy/JAX values, written atomically.

A leaf module (numpy only): the harness and the report both use it, neither imports the other's
internals for it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def jsonable(x):
  """Returns x as plain JSON data; non-finite floats become the strings 'nan', 'inf', '-inf'."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if hasattr(x, "__array__") and not isinstance(x, (str, bytes)):
    x = np.asarray(x)
    return jsonable(x.tolist()) if x.ndim else jsonable(x.item())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    x = float(x)
    return x if math.isfinite(x) else str(x)
  if x is None or isinstance(x, str):
    return x
  return repr(x)


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)
