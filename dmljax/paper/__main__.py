r"""``python -m dmljax.paper``: list, show, check, smoke-test and run the papers' table rows.

  python -m dmljax.paper list [PAPER] [--table T] [--dataset D] [--json]
  python -m dmljax.paper show ID [--json]
  python -m dmljax.paper check [PAPER] [--deep]
  python -m dmljax.paper smoke ID... [--workdir DIR]
  python -m dmljax.paper run ID... [--dry-run] [--launcher local|slurm|tpu] [--root DIR]

``list``: one line per row (id, method, protocol, command), or a JSON object per row.
``show``: the row's full config, each setting with its source (paper table / section /
supplement / the authors' code, or "not given by the paper; chosen: ...").
``check``: every row's config (and its smoke variant) builds and validates: framework, losses
(traced once, nothing compiled), sampler, optimizer, model definition (``--deep``: parameter
shapes too), input transforms, data set; no data or weights needed.
``smoke``: writes a tiny data set in the row's real file layout, prepares it, and trains the
row's ``small`` variant for two steps through the same command path (fold 0 of the protocol, or
the conventional mode); run it before a three-day job.
``run``: runs the rows one after the other (``--dry-run`` prints the commands), or prints the
SLURM (``launch/slurm.sbatch``) or Cloud TPU (``launch/tpu_pod.sh``) commands that run them.
Errors: one line, exit status 2 (``--verbose`` for the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from dmljax import cli
from dmljax import paper as paper_lib

PROG = "python -m dmljax.paper"

#: Tiny data set sizes for smoke runs (enough classes for the protocol's folds and a batch).
TINY = {"cub": dict(train_classes=8, test_classes=4, per_class=4),
        "cars": dict(train_classes=8, test_classes=4, per_class=4),
        "sop": dict(train_classes=12, test_classes=6),
        "inshop": dict(train_items=10, test_items=6)}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--verbose", action="store_true", help="tracebacks with error messages")
  sub = p.add_subparsers(dest="command", required=True)
  ls = sub.add_parser("list", help="the rows and their commands")
  ls.add_argument("paper", nargs="?", choices=list(paper_lib.PAPERS))
  ls.add_argument("--table", default=None, help="a table number (aliases count: CCP 5, 6)")
  ls.add_argument("--dataset", default=None, choices=["cub", "cars", "sop", "inshop"])
  ls.add_argument("--json", action="store_true", help="one JSON object per line")
  ls.add_argument("--root", default="runs", help="parent of the rows' workdirs (default runs)")
  sh = sub.add_parser("show", help="a row's config and the source of each setting")
  sh.add_argument("id")
  sh.add_argument("--small", action="store_true", help="the smoke variant")
  sh.add_argument("--json", action="store_true")
  ck = sub.add_parser("check", help="every row's config builds and validates")
  ck.add_argument("paper", nargs="?", choices=list(paper_lib.PAPERS))
  ck.add_argument("--deep", action="store_true",
                  help="also shape each distinct model's parameters (slower)")
  sm = sub.add_parser("smoke", help="two training steps of each row's small variant on tiny data")
  sm.add_argument("ids", nargs="+", metavar="ID")
  sm.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  rn = sub.add_parser("run", help="run rows, or print their launcher commands")
  rn.add_argument("ids", nargs="+", metavar="ID", help="row ids, or PAPER / PAPER/tableT "
                  "prefixes (every row under them)")
  rn.add_argument("--dry-run", action="store_true", help="print the commands, run none")
  rn.add_argument("--launcher", default="local", choices=["local", "slurm", "tpu"])
  rn.add_argument("--root", default="runs", help="parent of the rows' workdirs (default runs)")
  return p


# ============================================================================= list / show


def cmd_list(a) -> str:
  found = paper_lib.rows(a.paper, a.table, a.dataset)
  if not found:
    raise ValueError("no rows match; see python -m dmljax.paper list.")
  if a.json:
    return "\n".join(json.dumps(paper_lib.as_dict(r, a.root), sort_keys=True) for r in found)
  width = max(len(r.id) for r in found)
  lines = [f"{r.id:<{width}}  {r.method:<20}  {paper_lib.command(r, a.root)}" for r in found]
  lines.append(f"# {len(found)} rows")
  return "\n".join(lines)


def cmd_show(a) -> str:
  row = paper_lib.get_row(a.id)
  variant = "small" if a.small else ""
  items = paper_lib.settings(row, variant)
  if a.json:
    return json.dumps({"row": paper_lib.as_dict(row),
                       "settings": [{"key": k, "value": v, "source": s} for k, v, s in items]},
                      indent=2, default=str)
  head = [f"{row.id}: {row.method} ({paper_lib.PAPERS[row.paper]}), Table "
          f"{', '.join(row.tables)}, {row.dataset}",
          f"protocol: {row.protocol}; dtype: {row.dtype}; data copy: {row.data_copy}",
          f"command: {paper_lib.command(row, variant=variant)}",
          f"published ({row.published_ref}"
          + (f"; numbers quoted from {row.quoted_from}" if row.quoted_from else "") + "): "
          + (", ".join(f"{k} {v:.2f}" for k, v in row.published.items()) or "-")]
  head += [f"note: {n}" for n in row.notes]
  width = max(len(k) for k, _, _ in items)
  body = [f"{k:<{width}} = {v!r:<28}  # {s}" for k, v, s in items]
  return "\n".join(head + [""] + body)


# ============================================================================= check


def cmd_check(a) -> str:
  from dmljax.paper import check as check_lib  # pylint: disable=g-import-not-at-top
  found = paper_lib.rows(a.paper)
  t0 = time.time()
  errors = check_lib.check(found, deep=a.deep)
  if errors:
    raise ValueError(f"{len(errors)} of {2 * len(found)} row configs fail: " + " | ".join(errors))
  return (f"{len(found)} rows ({2 * len(found)} configs with the smoke variants) build and "
          f"validate ({time.time() - t0:.1f} s)")


# ============================================================================= smoke


def smoke(ids: Sequence[str], workdir: Optional[str] = None, say=print,
          overrides: Optional[dict] = None) -> list[dict]:
  """Two training steps of each row's ``small`` variant on a tiny data set in the row's file
  layout, through the protocol command's code path; returns each run's final metrics.
  ``overrides``: dotted config keys set on every run (tests turn checkpoints off)."""
  from dmljax import configs, protocol  # pylint: disable=g-import-not-at-top
  from dmljax.data import tiny  # pylint: disable=g-import-not-at-top
  rows = [paper_lib.get_row(i) for i in ids]
  root = workdir or tempfile.mkdtemp(prefix="dmljax_smoke_")
  data: dict[str, str] = {}
  out = []
  for row in rows:
    if row.dataset not in data:
      data[row.dataset] = tiny.prepare_tiny(row.dataset, os.path.join(root, "data", row.dataset),
                                            **TINY[row.dataset])
    cfg, _ = paper_lib.build(row, "small")
    with cfg.unlocked():
      cfg.dataset.data_dir = data[row.dataset]
      # The protocol reads the class pool with the data set's options only.
      cfg.dataset.options.data_dir = data[row.dataset]
      cfg.total_steps, cfg.eval_every_steps, cfg.log_every_steps = 2, 2, 1
      cfg.progress, cfg.num_devices = False, 1
      configs.set_keys(cfg, overrides or {})
    wd = os.path.join(root, "runs", row.id)
    t0 = time.time()
    if row.protocol == "4fold":
      protocol.run_protocol(cfg, wd, folds=[0])
      with open(os.path.join(protocol.fold_dir(wd, 0), "final_metrics.json")) as f:
        final = json.load(f)
    else:
      final = protocol.run_conventional(cfg, wd)
    if final.get("step") != 2 or final.get("nonfinite_steps", 0):
      raise RuntimeError(f"{row.id}: the smoke run ended at step {final.get('step')} with "
                         f"{final.get('nonfinite_steps')} non-finite steps")
    say(f"{row.id}: 2 steps, test MAP@R {final['test/map_at_r']:.3f} ({time.time() - t0:.1f} s; "
        f"{wd})")
    out.append(final)
  return out


def cmd_smoke(a) -> str:
  smoke(a.ids, a.workdir)
  return f"{len(a.ids)} row(s) trained two steps on tiny data"


# ============================================================================= run


def _select(ids: Sequence[str]) -> list[paper_lib.Row]:
  out = []
  for i in ids:
    parts = i.strip("/").split("/")
    if len(parts) >= 4:
      out.append(paper_lib.get_row(i))
      continue
    found = paper_lib.rows(parts[0], parts[1] if len(parts) > 1 else None,
                           parts[2] if len(parts) > 2 else None)
    if not found:
      raise ValueError(f"no rows under {i!r}; see python -m dmljax.paper list.")
    out.extend(found)
  return out


def launcher_command(row: paper_lib.Row, launcher: str, root: str) -> str:
  config = f"{paper_lib.CONFIG_FILE}:{row.id}"
  wd = paper_lib.workdir(row, root)
  if launcher == "local":
    return paper_lib.command(row, root)
  if launcher == "slurm":
    array = " --array=folds" if row.protocol == "4fold" else ""
    return f"bash launch/slurm.sbatch{array} --config={config} --workdir={wd}"
  if row.protocol == "4fold":
    raise ValueError(f"{row.id}: launch/tpu_pod.sh runs dmljax.main, one model; the 4-fold "
                     "protocol's rows need python -m dmljax.protocol (use --launcher=slurm or "
                     "local).")
  # The row's config is already conventional, so dmljax.main on the slice trains it the same.
  return (f"bash launch/tpu_pod.sh --name=NAME --zone=ZONE --repo=GIT_URL --config={config} "
          f"--workdir=gs://BUCKET/{wd}")


def cmd_run(a) -> str:
  rows = _select(a.ids)
  cmds = [launcher_command(r, a.launcher, a.root) for r in rows]
  if a.dry_run or a.launcher != "local":
    return "\n".join(cmds)
  for row, cmd in zip(rows, cmds):
    print(f"# {row.id}: {cmd}", flush=True)
    status = subprocess.call(shlex.split(cmd))
    if status:
      raise RuntimeError(f"{row.id} failed (exit status {status}); the rows after it were not "
                         "run. Running the same command again resumes it.")
  return f"{len(rows)} row(s) finished"


def main(argv: Optional[Sequence[str]] = None) -> str:
  a = _parser().parse_args(argv)
  text = {"list": cmd_list, "show": cmd_show, "check": cmd_check, "smoke": cmd_smoke,
          "run": cmd_run}[a.command](a)
  print(text, flush=True)
  return text


def run(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
