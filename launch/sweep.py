r"""Chooses one config value on validation: one run per value (one seed), the best val MAP@R wins.

  python launch/sweep.py CONFIG ROOT KEY V1,V2,... [--seed=0] [--timeout=S] [-- --config.x=y ...]

  python launch/sweep.py configs/glyphs_dro_kl.py /tmp/sweep_kl dro.kwargs.gamma 0.1,0.3,0.5,0.7,0.9

Each value trains ``python -m dmljax.main --config=CONFIG --workdir=ROOT/<KEY>=<V>
--config.seed=SEED --config.<KEY>=<V>`` plus the overrides after ``--`` (a finished workdir is
reused: the run resumes, i.e. returns at once). The table of validation and test MAP@R per value
goes to stdout and ``ROOT/sweep.json``; the last line printed is the winning override,
``--config.<KEY>=<V>``, so that a script can hand it to ``launch/seeds.sh``:

  best=$(python launch/sweep.py CONFIG ROOT KEY VALUES | tail -n 1)
  bash launch/seeds.sh CONFIG ROOT/seeds "0 1 2" "$best"

Only validation decides (ties: the first value); test MAP@R is printed for the record. A run that
fails or times out is listed with its status, and then no value is chosen (exit status 1): the
winner of an incomplete grid is not the grid's choice, so fix the failed runs (their output is
above the table) and run the same command again, which reuses every finished workdir. With
``--allow_failed`` the best finished value is chosen anyway (exit status 1 still when none finished).
"""
import argparse
import json
import os
import subprocess
import sys


def run_value(config, root, key, value, seed, timeout, extra):
  workdir = os.path.join(root, f"{key}={value}")
  cmd = [sys.executable, "-m", "dmljax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.seed={seed}", f"--config.{key}={value}", "--config.progress=False", *extra]
  print("+ " + " ".join(cmd), flush=True)
  try:
    status = subprocess.run(cmd, timeout=timeout or None, check=False).returncode
  except subprocess.TimeoutExpired:
    status = "timeout"
  path = os.path.join(workdir, "final_metrics.json")
  if status != 0 or not os.path.exists(path):
    return {"value": value, "status": status}
  with open(path) as f:
    final = json.load(f)
  return {"value": value, "status": 0, "val/map_at_r": final["val/map_at_r"],
          "test/map_at_r": final["test/map_at_r"], "workdir": workdir}


def main(argv):
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(prog="python launch/sweep.py", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("config")
  parser.add_argument("root")
  parser.add_argument("key", help="config key, e.g. dro.kwargs.gamma")
  parser.add_argument("values", help="comma-separated values")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--timeout", type=float, default=0, help="seconds per run (0: none)")
  parser.add_argument("--allow_failed", action="store_true",
                      help="choose among the finished values when some failed")
  args = parser.parse_args(argv)
  values = [v for v in args.values.split(",") if v]
  if not values:
    parser.error("no values to sweep")
  results = [run_value(args.config, args.root, args.key, v, args.seed, args.timeout, extra)
             for v in values]
  done = [r for r in results if r["status"] == 0]
  print(f"\nsweep of {args.key} on {args.config} (seed {args.seed}):")
  print(f"  {'value':>10} {'val MAP@R':>10} {'test MAP@R':>10}")
  for r in results:
    if r["status"] == 0:
      print(f"  {r['value']:>10} {r['val/map_at_r']:>10.4f} {r['test/map_at_r']:>10.4f}")
    else:
      print(f"  {r['value']:>10} {'failed (' + str(r['status']) + ')':>21}")
  os.makedirs(args.root, exist_ok=True)
  failed = [r["value"] for r in results if r["status"] != 0]
  best = max(done, key=lambda r: r["val/map_at_r"]) if done else None
  if failed and not args.allow_failed:
    best = None  # an incomplete grid chooses nothing
  with open(os.path.join(args.root, "sweep.json"), "w") as f:
    json.dump({"config": args.config, "key": args.key, "seed": args.seed, "extra": extra,
               "results": results, "best": best and best["value"]}, f, indent=1)
  if not done:
    print("no run finished", file=sys.stderr)
    return 1
  if best is None:
    print(f"no value chosen: the runs of {', '.join(failed)} failed (their output is above); "
          "fix them and run the same command again (finished workdirs are reused), or pass "
          "--allow_failed to choose among the finished values", file=sys.stderr)
    return 1
  print(f"best on validation: {args.key}={best['value']}")
  print(f"--config.{args.key}={best['value']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
