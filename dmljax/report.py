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

**Beside the paper** (``--paper P --table T``, the catalogue of ``python -m dmljax.paper``)::

  python -m dmljax.report --paper ccp --table 2 runs/ccp/table2
  python -m dmljax.report --paper profs --table 1 runs/

renders table T of paper P in the paper's shape, one markdown table per data set: every row of
the table, the published number (shipped with the catalogue, with its table reference) beside
ours and the difference (ours - paper, in points). A run is matched to its row by the row id it
recorded when it was started from the catalogue (``paper_row`` in its ``config.json``); each DIR
is a run or protocol directory, or a folder searched for them. Rows without a run show "not
run"; rows the paper quotes from other work are shown as such (published numbers only). The
4-fold rows' 512-D columns are the concatenated fold models, the 128-D columns the mean (± sample
std) of the four; several runs of one row (seeds) are pooled the same way.
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


# ============================================================================= beside the paper

#: The papers' metric names -> dmljax's metric keys.
_METRICS = {"P@1": "precision_at_1", "P@R": "r_precision", "MAP@R": "map_at_r", "NMI": "nmi",
            "F1": "f1"}


def _metric_key(label: str) -> str:
  if label in _METRICS:
    return _METRICS[label]
  m = re.fullmatch(r"(R|nDCG)@(\d+)", label)
  if not m:
    raise ValueError(f"no metric for the column {label!r}")
  return f"{'recall' if m.group(1) == 'R' else 'ndcg'}_at_{m.group(2)}"


def _row_id(path: str) -> Optional[str]:
  """The catalogue row a run or protocol directory recorded (``paper_row`` of its config)."""
  for cfg in (os.path.join(path, "config.json"), os.path.join(path, "fold_0", "config.json")):
    if os.path.isfile(cfg):
      try:
        row = _read(cfg).get("paper_row")
      except ValueError:
        return None
      return row or None
  return None


def find_runs(dirs: Sequence[str]) -> list[str]:
  """Run and protocol directories at or below ``dirs`` (fold dirs of a protocol excluded)."""
  found = []
  for top in dirs:
    if not os.path.isdir(top):
      raise ValueError(f"{top}: no such directory.")
    for here, subdirs, files in os.walk(top):
      if PROTOCOL_FILE in files or (RUN_FILE in files and "config.json" in files):
        found.append(here)
        subdirs[:] = []  # a protocol's fold dirs, or a run's own subfolders
      elif any(re.fullmatch(r"fold_\d+", d) for d in subdirs):
        subdirs[:] = []  # an unfinished protocol: not a result yet
      else:
        subdirs[:] = sorted(d for d in subdirs if d not in ("checkpoints", "tensorboard", "plots"))
  return found


def _ours(row, sources: Sequence[dict]) -> dict[str, list[float]]:
  """``{column: [values, in %]}`` of the runs of ``row`` (4-fold: ``512/...`` concatenated,
  ``128/...`` the fold models; conventional: the test split)."""
  out: dict[str, list[float]] = {}
  for src in sources:
    if src["kind"] == "protocol":
      parts = (("512", src["concatenated"]), ("128", src["separate"]))
    else:
      parts = (("", src["separate"]),)
    for prefix, samples in parts:
      for sample in samples:
        for key, value in sample.items():
          if value is not None and np.isfinite(value):
            out.setdefault(f"{prefix}/{key}" if prefix else key, []).append(100.0 * value)
  return out


def render_paper(paper: str, table: str, dirs: Sequence[str], decimals: int = 2) -> str:
  """Table ``table`` of ``paper`` with the published numbers, ours and the difference."""
  from dmljax import paper as paper_lib  # pylint: disable=g-import-not-at-top
  table = str(table).lower().removeprefix("table")
  layouts = paper_lib.published_tables(paper)
  if table not in layouts:
    raise ValueError(f"{paper} has no table {table!r} in the catalogue; tables: "
                     f"{sorted(layouts)}.")
  layout = layouts[table]
  rows = paper_lib.rows(paper, table)
  by_row: dict[str, list[dict]] = {}
  for path in find_runs(dirs):
    rid = _row_id(path)
    if rid is not None:
      by_row.setdefault(rid, []).append(load_source(path))
  out = [f"## {layout['title']}", ""]
  notes = []
  for ds in layout["datasets"]:
    cols = layout["columns"][ds] if isinstance(layout["columns"], dict) else layout["columns"]
    header = ["method"]
    for c in cols:
      header += [f"{c} paper", f"{c} ours", "Δ"]
    body = []
    for q in paper_lib.quoted_rows(paper, table):
      if q.dataset == ds:
        body.append([f"{q.method} (quoted)"]
                    + [x for c in cols for x in (_fmt(q.published.get(c), decimals), "", "")])
    for row in (r for r in rows if r.dataset == ds):
      runs = by_row.get(row.id, [])
      ours = _ours(row, runs)
      name = row.method + (" †" if row.quoted_from else "")
      if row.quoted_from:
        notes.append(f"† {row.id}: the published numbers are quoted from {row.quoted_from}.")
      cells = [name]
      for c in cols:
        pub = row.published.get(c)
        key = (c.split("/", 1)[0] + "/" + _metric_key(c.split("/", 1)[1]) if "/" in c
               else _metric_key(c))
        vals = ours.get(key, [])
        if not runs:
          mine, diff = "not run", ""
        elif not vals:
          mine, diff = "-", ""
        else:
          mean = float(np.mean(vals))
          mine = (f"{mean:.{decimals}f}" if len(vals) == 1 else
                  f"{mean:.{decimals}f} ± {np.std(vals, ddof=1):.{decimals}f}")
          diff = "" if pub is None else f"{mean - pub:+.{decimals}f}"
        cells += [_fmt(pub, decimals), mine, diff]
      body.append(cells)
    out.append(_table(f"{ds} ({paper} Table {table})", header, body))
    out.append("")
  out.append("paper: the published number (%); ours: this project's run (mean ± sample std "
             "over fold models or runs); Δ: ours - paper, in points; not run: no run of the row "
             "among the DIRs; (quoted): the paper quotes it from other work, not a run.")
  out += sorted(set(notes))
  return "\n".join(out)


def _fmt(value, decimals: int) -> str:
  return "-" if value is None else f"{value:.{decimals}f}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description="Markdown tables of finished runs.")
  p.add_argument("dirs", nargs="+", metavar="DIR",
                 help=f"protocol dirs ({PROTOCOL_FILE}) or run dirs ({RUN_FILE})")
  p.add_argument("--names", default=None,
                 help="comma-separated row names, one per DIR (equal names pool DIRs)")
  p.add_argument("--decimals", type=int, default=None,
                 help="decimals of the percentages (default 1; 2 beside a paper)")
  p.add_argument("--paper", default=None,
                 help="render a table of this paper (ccp, profs, dro, mpa) with its published "
                      "numbers; runs are matched to rows by the row id they recorded")
  p.add_argument("--table", default=None, help="the table of --paper (e.g. 2)")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> str:
  """Prints and returns the tables (raises on errors; :func:`run` reports them)."""
  a = parse_args(argv)
  if (a.paper is None) != (a.table is None):
    raise ValueError("--paper and --table go together, e.g. --paper ccp --table 2.")
  if a.paper is not None:
    from dmljax import paper as paper_lib  # pylint: disable=g-import-not-at-top
    if a.paper not in paper_lib.PAPERS:
      raise ValueError(f"Unknown --paper {a.paper!r}; valid: {list(paper_lib.PAPERS)}.")
    if a.names is not None:
      raise ValueError("--names does not apply with --paper: rows are named by the paper.")
    text = render_paper(a.paper, a.table, a.dirs, 2 if a.decimals is None else a.decimals)
    print(text)
    return text
  if a.decimals is None:
    a.decimals = 1
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
