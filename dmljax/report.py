r"""Markdown tables of finished runs, shaped like the papers' tables.

  python -m dmljax.report /tmp/dmljax/glyphs_4fold /tmp/dmljax/glyphs_ccp
  python -m dmljax.report runs/s0 runs/s1 runs/s2 runs/proto --names ccp,ccp,ccp,ccp-4fold

Each DIR is a protocol directory (``protocol_results.json`` of ``python -m dmljax.protocol``) or
a plain run directory (``final_metrics.json`` of ``python -m dmljax.main``, a fold dir too). A
row is named by its DIR as given, or by ``--names`` (one comma-separated name per DIR); DIRs
given the same name are pooled into one row (seeds of a run, or several protocol runs).

Test-set values, in percent with one decimal (``--decimals``); a row with several values (the
fold models of a protocol, pooled seeds) shows ``mean ± std`` (sample standard deviation,
``ddof=1``); ``-`` marks a value the row does not have. Tables, each printed only when some row
has its metrics:

* **P@1, P@R, MAP@R** (CCP Table II; P@R is ``r_precision``): the concatenated models (512-D
  in the paper) and the separate fold models (128-D) side by side; a plain run counts as one
  separate model. Column groups are named by the embedding sizes when the rows agree on them.
* **NMI, F1, R@k** (PROFS Table 1), when clustering was computed (``config.clustering``).
* **R@k, nDCG@k** (the DRO and MPA tables), when recall cut-offs other than 1 or nDCG were
  computed (``config.recall_ks``, ``config.ndcg_ks``).

In the last two a protocol row is split into ``NAME (128D)`` (separate models) and
``NAME (512D)`` (concatenated), with the sizes of that run. Errors: one line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

import numpy as np

from dmljax import cli

PROG = "python -m dmljax.report"
PROTOCOL_FILE = "protocol_results.json"
RUN_FILE = "final_metrics.json"

RETRIEVAL = (("P@1", "precision_at_1"), ("P@R", "r_precision"), ("MAP@R", "map_at_r"))

__all__ = ["load_source", "render", "main", "run"]


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); was it written by an interrupted run?"
                     ) from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds no JSON object.")
  return data


def _test_metrics(final: dict) -> dict[str, float]:
  return {k[5:]: float(v) for k, v in final.items()
          if k.startswith("test/") and "/" not in k[5:] and isinstance(v, (int, float))}


def load_source(path: str) -> dict[str, Any]:
  """One DIR: ``{"path", "kind", "separate": [metrics], "concatenated": [metrics], "dim",
  "concatenated_dim"}`` (test metrics as fractions; dims None when unknown)."""
  protocol, run = os.path.join(path, PROTOCOL_FILE), os.path.join(path, RUN_FILE)
  if os.path.isfile(protocol):
    data = _read(protocol)
    try:
      return {"path": path, "kind": "protocol",
              "separate": [dict(f["test"]) for f in data["folds"]],
              "concatenated": [dict(data["concatenated"])],
              "dim": data.get("embedding_dim"), "concatenated_dim": data.get("concatenated_dim")}
    except (KeyError, TypeError) as e:
      raise ValueError(f"{protocol} lacks {cli.message(e)!r}; write it again with "
                       "python -m dmljax.protocol.") from None
  if os.path.isfile(run):
    dim = None
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
      try:
        dim = _read(cfg_path).get("model", {}).get("embedding_dim")
      except (ValueError, AttributeError):
        dim = None
    return {"path": path, "kind": "run", "separate": [_test_metrics(_read(run))],
            "concatenated": [], "dim": dim, "concatenated_dim": None}
  if os.path.isdir(path) and any(re.fullmatch(r"fold_\d+", n) for n in os.listdir(path)):
    raise ValueError(f"{path} is a protocol directory without {PROTOCOL_FILE}: not all folds "
                     "are finished; run python -m dmljax.protocol on it again.")
  if not os.path.isdir(path):
    raise ValueError(f"{path}: no such directory.")
  raise ValueError(f"{path} has neither {PROTOCOL_FILE} nor {RUN_FILE}: not a finished run.")


# ============================================================================= formatting


def _cell(samples: Sequence[dict], key: str, decimals: int) -> str:
  vals = np.array([s[key] for s in samples if key in s and s[key] is not None], np.float64)
  vals = vals[np.isfinite(vals)] * 100.0
  if vals.size == 0:
    return "-"
  if vals.size == 1:
    return f"{vals[0]:.{decimals}f}"
  return f"{vals.mean():.{decimals}f} ± {vals.std(ddof=1):.{decimals}f}"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _dim_label(dims: set, fallback: str) -> str:
  dims = {d for d in dims if d is not None}
  return f"{int(next(iter(dims)))}D" if len(dims) == 1 else fallback


def _ks(rows, prefix: str) -> list[int]:
  ks = set()
  for r in rows:
    for s in r["separate"] + r["concatenated"]:
      for k in s:
        m = re.fullmatch(prefix + r"(\d+)", k)
        if m:
          ks.add(int(m.group(1)))
  return sorted(ks)


def _group(sources: Sequence[dict], names: Sequence[str]) -> list[dict]:
  rows: dict[str, dict] = {}
  for name, src in zip(names, sources):
    row = rows.setdefault(name, {"name": name, "separate": [], "concatenated": [],
                                 "dims": set(), "cdims": set()})
    row["separate"] += src["separate"]
    row["concatenated"] += src["concatenated"]
    row["dims"].add(src["dim"])
    if src["concatenated"]:
      row["cdims"].add(src["concatenated_dim"])
  return list(rows.values())


def _split_rows(rows) -> list[tuple[str, list]]:
  """(label, samples) per table row: a row with concatenated results gives two."""
  out = []
  for r in rows:
    if not r["concatenated"]:
      out.append((r["name"], r["separate"]))
      continue
    out.append((f"{r['name']} ({_dim_label(r['dims'], 'single')})", r["separate"]))
    out.append((f"{r['name']} ({_dim_label(r['cdims'], 'concat.')})", r["concatenated"]))
  return out


def render(sources: Sequence[dict], names: Optional[Sequence[str]] = None,
           decimals: int = 1) -> str:
  """The markdown tables of ``sources`` (:func:`load_source` results) as one string."""
  names = [os.path.normpath(s["path"]) for s in sources] if names is None else list(names)
  rows = _group(sources, names)
  tables = []

  # ----------------------------------------------------------- CCP Table II
  with_cat = [r for r in rows if r["concatenated"]]
  header, groups = ["run"], []
  if with_cat:
    label = _dim_label(set().union(*(r["cdims"] for r in with_cat)), "concat.")
    groups.append((label, "concatenated"))
  groups.append((_dim_label(set().union(*(r["dims"] for r in rows)), "single"), "separate"))
  for label, _ in groups:
    header += [f"{label} {m}" for m, _ in RETRIEVAL]
  body = [[r["name"]] + [_cell(r[part], key, decimals) for _, part in groups
                         for _, key in RETRIEVAL] for r in rows]
  tables.append(_table("P@1, P@R, MAP@R (test, %; as CCP Table II)", header, body))

  split = _split_rows(rows)
  # ----------------------------------------------------------- PROFS Table 1
  recall = _ks(rows, "recall_at_")
  if any("nmi" in s or "f1" in s for _, samples in split for s in samples):
    cols = [("NMI", "nmi"), ("F1", "f1")] + [(f"R@{k}", f"recall_at_{k}") for k in recall]
    tables.append(_table("NMI, F1, R@k (test, %; as PROFS Table 1)", ["run"] + [c for c, _ in cols],
                         [[label] + [_cell(s, key, decimals) for _, key in cols]
                          for label, s in split]))

  # ----------------------------------------------------------- DRO / MPA tables
  ndcg = _ks(rows, "ndcg_at_")
  if ndcg or any(k != 1 for k in recall):
    cols = ([(f"R@{k}", f"recall_at_{k}") for k in recall]
            + [(f"nDCG@{k}", f"ndcg_at_{k}") for k in ndcg])
    tables.append(_table("R@k, nDCG@k (test, %; as the DRO and MPA tables)",
                         ["run"] + [c for c, _ in cols],
                         [[label] + [_cell(s, key, decimals) for _, key in cols]
                          for label, s in split]))
  note = ("a ± b: mean ± sample standard deviation over the row's fold models or runs; "
          "-: not measured.")
  return "\n\n".join(tables) + "\n\n" + note


# ============================================================================= command line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description="Markdown tables of finished runs.")
  p.add_argument("dirs", nargs="+", metavar="DIR",
                 help=f"protocol dirs ({PROTOCOL_FILE}) or run dirs ({RUN_FILE})")
  p.add_argument("--names", default=None,
                 help="comma-separated row names, one per DIR (equal names pool DIRs)")
  p.add_argument("--decimals", type=int, default=1, help="decimals of the percentages")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
  """Prints and returns the tables (raises on errors; :func:`run` reports them)."""
  a = parse_args(argv)
  names = None
  if a.names is not None:
    names = [n.strip() for n in a.names.split(",")]
    if len(names) != len(a.dirs) or not all(names):
      raise ValueError(f"--names gives {len(names)} names for {len(a.dirs)} DIRs; give one "
                       "non-empty name per DIR, in order (repeat a name to pool DIRs).")
  if a.decimals < 0:
    raise ValueError(f"--decimals must be >= 0, got {a.decimals}.")
  text = render([load_source(d) for d in a.dirs], names, a.decimals)
  print(text)
  return text


def run(argv: Optional[Sequence[str]] = None) -> int:
  """``main`` with errors as one message (exit status 2) instead of a traceback."""
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
