"""Published numbers as data: parsing the tables copied from the papers' text."""
from __future__ import annotations

from typing import Optional, Sequence


def parse(text: str, columns: Sequence[str]) -> dict[str, dict[str, Optional[float]]]:
  """``{method: {column: value or None}}`` from tab-separated lines ``METHOD<TAB>v1<TAB>v2...``
  (``-`` for a value the paper does not give). Raises ValueError on a line of the wrong width."""
  out = {}
  for line in text.strip("\n").splitlines():
    if not line.strip():
      continue
    name, *cells = [c.strip() for c in line.split("\t")]
    if len(cells) != len(columns):
      raise ValueError(f"published row {name!r}: {len(cells)} values for {len(columns)} columns")
    out[name] = {col: (None if cell == "-" else float(cell)) for col, cell in zip(columns, cells)}
  return out


def pick(table: dict, method: str, prefix: str = "") -> dict[str, float]:
  """The given values of ``method``, columns ``PREFIX...`` with the prefix removed."""
  vals = table[method]
  return {k[len(prefix):]: v for k, v in vals.items() if k.startswith(prefix) and v is not None}
