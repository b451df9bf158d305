"""Converts a PyTorch weight file ahead of training and prints what it matched.

  python -m dmljax.models.import_weights ARCH FILE.pth [--cache-dir DIR]

``ARCH`` is ``bn_inception``, ``googlenet``, ``resnet50``, ``resnet_v2_20`` or ``small_cnn``. The
converted variables go to the weight cache (``~/.cache/dmljax/weights/ARCH-<sha256>.npz`` unless
``--cache-dir`` or ``$DMLJAX_WEIGHTS_CACHE`` says otherwise), where training with
``--config.model.pretrained=FILE.pth`` finds them. Any problem (no such file, a truncated or
damaged file, a file of another architecture, a cache that cannot be written) is one line and exit
status 2; ``--verbose`` adds the traceback and the list of missing, unexpected and mis-shaped
tensors.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Optional, Sequence

from dmljax.models import torch_import


PROG = "python -m dmljax.models.import_weights"


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (2 for any problem with the file, the
  architecture or the cache, as one line; ``--verbose`` adds the traceback and full listings)."""
  from dmljax import cli  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  return cli.run_main(PROG, _run, argv)


def _run(argv) -> None:
  from dmljax import cli  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog=PROG, description="Convert a PyTorch state dict (.pth) into dmljax's weight cache.")
  parser.add_argument("arch", choices=sorted(torch_import.ARCHS))
  parser.add_argument("file", help="torch.save(model.state_dict()) file")
  parser.add_argument("--cache-dir", default=None,
                      help=f"cache folder (default {torch_import.default_cache_dir()})")
  parser.add_argument("--verbose", action="store_true",
                      help="show tracebacks and the full list of tensors that do not fit")
  args = parser.parse_args(argv)
  try:
    state_dict = torch_import.load_state_dict(args.file)
  except (EOFError, pickle.UnpicklingError) as e:
    raise ValueError(f"{args.file}: a damaged or truncated weight file ({cli.message(e)}); "
                     "download it again.") from e
  try:
    variables, report = torch_import.convert_state_dict(args.arch, state_dict, source=args.file)
  except ValueError as e:
    lines = str(e).splitlines()
    if len(lines) > 1 and not args.verbose:
      # The listing of every tensor that does not fit is for --verbose; one line here.
      raise ValueError(f"{lines[0].rstrip(':')}; is {args.file} a {args.arch} file? (--verbose "
                       f"lists the {len(lines) - 1} tensors)") from e
    raise
  target = torch_import.cache_path(args.arch, args.file, args.cache_dir)
  try:
    torch_import.save_converted(variables, target)
  except OSError as e:
    raise OSError(f"cannot write the weight cache {os.path.dirname(os.path.abspath(target))} "
                  f"({cli.message(e)}); give --cache-dir=DIR (or $DMLJAX_WEIGHTS_CACHE) on a "
                  "writable disk") from e
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


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == "__main__":
  sys.exit(main())
