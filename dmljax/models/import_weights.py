"""Converts a PyTorch weight file ahead of training and prints what it matched.

  python -m dmljax.models.import_weights ARCH FILE.pth [--cache-dir DIR]

``ARCH`` is ``bn_inception``, ``googlenet``, ``resnet50``, ``resnet_v2_20`` or ``small_cnn``. The
converted variables go to the weight cache (``~/.cache/dmljax/weights/ARCH-<sha256>.npz`` unless
``--cache-dir`` or ``$DMLJAX_WEIGHTS_CACHE`` says otherwise), where training with
``--config.model.pretrained=FILE.pth`` finds them. Exit status 1 (and the list of missing,
unexpected and mis-shaped tensors) when the file does not fit the backbone.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from dmljax.models import torch_import


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog="python -m dmljax.models.import_weights",
      description="Convert a PyTorch state dict (.pth) into dmljax's weight cache.")
  parser.add_argument("arch", choices=sorted(torch_import.ARCHS))
  parser.add_argument("file", help="torch.save(model.state_dict()) file")
  parser.add_argument("--cache-dir", default=None,
                      help=f"cache folder (default {torch_import.default_cache_dir()})")
  args = parser.parse_args(argv)
  try:
    state_dict = torch_import.load_state_dict(args.file)
    variables, report = torch_import.convert_state_dict(args.arch, state_dict, source=args.file)
  except (OSError, ValueError) as e:  # includes UnsafeWeightFile
    print(f"error: {e}", file=sys.stderr)
    return 1
  target = torch_import.cache_path(args.arch, args.file, args.cache_dir)
  torch_import.save_converted(variables, target)
  n_params = sum(int(v.size) for v in _leaves(variables.get("params", {})))
  print(f"{args.arch}: matched {len(report.matched)} of {len(state_dict)} tensors from "
        f"{args.file} ({n_params:,} parameters)")
  if report.squeezed:
    print(f"  reshaped from [1, C]-style shapes ({len(report.squeezed)}): "
          + ", ".join(report.squeezed))
  counters = [k for k in report.ignored if k.endswith(".num_batches_tracked")]
  others = [k for k in report.ignored if k not in counters]
  if counters:
    print(f"  ignored {len(counters)} BatchNorm num_batches_tracked counters")
  if others:
    print(f"  ignored ({len(others)}, classifier / auxiliary heads): " + ", ".join(others))
  print(f"  cached at {os.path.abspath(target)}")
  return 0


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == "__main__":
  sys.exit(main())
