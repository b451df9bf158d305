"""Mean ± std (over runs) of the final metrics of finished runs.

  python launch/summarize.py /tmp/dmljax/glyphs_ccp/seed*

Reads ``final_metrics.json`` of every workdir given, and, where CCP logged them, the proxy spread
and covering radii from ``metrics.jsonl``.
"""
import json
import os
import sys

import numpy as np

KEYS = ("test/map_at_r", "test/precision_at_1", "test/r_precision",
        "val/map_at_r", "val/precision_at_1",
        "untrained/test/map_at_r", "untrained/test/precision_at_1",
        "pixels/test/map_at_r", "pixels/test/precision_at_1")


def _ccp_events(workdir):
  """Per-projection CCP events and the last logged proxy spread of one run."""
  radii, spread = [], None
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "ccp/proxy_spread" in rec:
        spread = rec["ccp/proxy_spread"]
      if "ccp/pool_radius_converged_proxies" in rec:
        radii.append((rec["ccp/pool_radius_converged_proxies"], rec["ccp/pool_radius_new_proxies"]))
  return radii, spread


def main(workdirs):
  finals, spreads = [], []
  for w in workdirs:
    path = os.path.join(w, "final_metrics.json")
    if not os.path.exists(path):
      print(f"{w}: no final_metrics.json (run not finished)")
      continue
    with open(path) as f:
      finals.append(json.load(f))
    radii, spread = _ccp_events(w)
    if spread is not None:
      spreads.append(spread)
    if radii:
      print(f"{w}: pool covering radius per projection end (converged -> new proxies): "
            + ", ".join(f"{a:.3f}->{b:.3f}" for a, b in radii))
  if not finals:
    return 1
  print(f"runs: {len(finals)}")
  for key in KEYS:
    vals = np.array([m[key] for m in finals if key in m])
    if vals.size:
      print(f"  {key:22s} {vals.mean():.4f} ± {vals.std(ddof=1) if vals.size > 1 else 0.0:.4f}"
            f"   ({', '.join(f'{v:.4f}' for v in vals)})")
  if spreads:
    s = np.array(spreads)
    print(f"  {'ccp/proxy_spread':22s} {s.mean():.4f} ± {s.std(ddof=1) if s.size > 1 else 0.0:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
