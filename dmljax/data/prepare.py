"""Prepare a data set: ``python -m dmljax.data.prepare NAME|folder|csv ...``.

::

    python -m dmljax.data.prepare cub --manual_dir=~/downloads/cub --data_dir=~/tensorflow_datasets
    python -m dmljax.data.prepare sop --manual_dir=DIR --data_dir=DIR --json=sop_prepare.json
    python -m dmljax.data.prepare folder --manual_dir=~/photos --data_dir=DIR --name=shop
    python -m dmljax.data.prepare csv --manual_dir=~/photos/labels.csv --data_dir=DIR --name=shop

NAME is ``cub``, ``cars``, ``sop`` or ``inshop``: ``--manual_dir`` holds the files as distributed
(archives, or the folders they extract to; ``docs/data.md`` lists them). ``folder`` and ``csv``
prepare your own images under ``--name``: a folder with one sub-folder per class (or split
folders train/test or train/query/gallery above them; ``--layout``), or a CSV file of
``path,label[,split][,x1,y1,x2,y2]``; without splits, ``--test_fraction`` of the classes (default
half, by name; ``--shuffle_seed`` draws them) are for testing (:mod:`dmljax.data.own`,
``docs/own_data.md``). ``--data_dir`` is the TFDS data folder the data set is written to (as
``dmljax_NAME/1.0.0``, array_record files), read back by
:func:`dmljax.data.records.open_prepared` or ``tfds.data_source("dmljax_NAME", data_dir=...)``.

Every input file is located and every image decoded before anything is written: missing
benchmark files are all named in one error; images that do not decode (and CSV rows whose file is
missing) are skipped, each named in a warning. The command ends with a table of the splits
(images, classes, skipped) and, with ``--json``, writes ``{"name", "tfds_name", "path", "splits":
{split: {"images", "classes"}}, "skipped": {split: [paths]}}``. A data set already prepared in
``--data_dir`` is left as it is unless ``--overwrite`` is given; for your own images, an input
that changed since it was prepared is refused instead (``--overwrite`` rebuilds it).

``--short_side=256`` stores every image resized so its shorter side is 256 (torchvision's
``Resize(256)``, JPEG quality ``--jpeg_quality``, default 95; boxes and sizes rescaled), so the
protocol's resize-then-crop decodes a small file; the data set's metadata records the copy
(``image_copy``: ``full`` or ``short_side_256``). Prepare it into its own ``--data_dir``: one
``--data_dir`` holds one copy of a data set, and asking for the other copy where one is prepared
is refused (``--overwrite`` replaces it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from dmljax import cli

PROG = "python -m dmljax.data.prepare"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog=PROG, description="Prepare a metric-learning data set (TFDS, "
                              "array_record) from the downloaded files, or from your own images.")
  from dmljax.data import own  # pylint: disable=g-import-not-at-top
  p.add_argument("name", help=f"data set: {', '.join(builders.NAMES)}, or {' / '.join(own.KINDS)} "
                 "for your own images (with --name)")
  p.add_argument("--manual_dir", default=None,
                 help="folder holding the downloaded archives or their extracted folders; for "
                 "folder: the folder of class sub-folders; for csv: the CSV file")
  p.add_argument("--name", default=None, dest="own_name",
                 help="folder / csv: the data set's name (--config.dataset.name=NAME)")
  p.add_argument("--layout", default=None, choices=own.LAYOUTS,
                 help="folder: classes (ROOT/CLASS/...), splits (ROOT/train/CLASS/...) or auto "
                 "(default: splits when ROOT holds nothing but split folders)")
  p.add_argument("--test_fraction", type=float, default=None,
                 help="folder / csv without splits: fraction of the classes for testing "
                 "(default 0.5; the classes sorted by name, the first ones train)")
  p.add_argument("--shuffle_seed", type=int, default=None,
                 help="folder / csv without splits: draw the training classes at random with "
                 "this seed instead of by name")
  p.add_argument("--data_dir", default=None, help="TFDS data folder to write the data set to")
  p.add_argument("--json", default=None, help="also write the split summary to this JSON file")
  p.add_argument("--overwrite", action="store_true",
                 help="rebuild the data set even if it is already prepared in --data_dir")
  p.add_argument("--workers", type=int, default=None,
                 help="threads decoding the images (default: up to 8)")
  p.add_argument("--short_side", type=int, default=0,
                 help="store each image resized so its shorter side is this (e.g. 256: the "
                 "protocol's resize; boxes rescaled), a JPEG of --jpeg_quality; 0 (default) "
                 "stores the files as distributed")
  p.add_argument("--jpeg_quality", type=int, default=None,
                 help="JPEG quality of the --short_side copies (default 95)")
  p.add_argument("--verbose", action="store_true", help="show tracebacks with error messages")
  return p.parse_args(argv)


def check_copy_options(short_side: int, jpeg_quality: Optional[int]) -> int:
  """Validates ``--short_side`` / ``--jpeg_quality``; returns the quality to use."""
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  if int(short_side) != short_side or short_side < 0:
    raise ValueError(f"--short_side must be an integer >= 0 (0: the files as distributed), got "
                     f"{short_side}.")
  if jpeg_quality is None:
    return builders.FULL_QUALITY
  if not short_side:
    raise ValueError("--jpeg_quality is for the --short_side copies; the full copy stores the "
                     "files as distributed (add --short_side=256, or drop --jpeg_quality).")
  if not 1 <= int(jpeg_quality) <= 100:
    raise ValueError(f"--jpeg_quality must be in 1..100, got {jpeg_quality}.")
  return int(jpeg_quality)


def prepare(name: str, manual_dir: Optional[str], data_dir: str, *, overwrite: bool = False,
            workers: Optional[int] = None, short_side: int = 0,
            jpeg_quality: Optional[int] = None,
            log: Optional[Callable[[str], None]] = None) -> dict:
  """Builds the TFDS data set ``dmljax_NAME`` in ``data_dir`` from the files in ``manual_dir``.

  Args:
    name: ``cub``, ``cars``, ``sop`` or ``inshop``.
    manual_dir: folder with the downloaded files (not needed when already prepared).
    data_dir: TFDS data folder.
    overwrite: rebuild even if a finished preparation exists (the old one is deleted only once
      every input file has been checked).
    workers: threads decoding images.
    short_side: 0 stores the image files as distributed; N > 0 stores each image resized so its
      shorter side is N (boxes and sizes rescaled; :func:`dmljax.data.builders.shrink_image`).
    jpeg_quality: JPEG quality of the short-side copy (default 95).
    log: called with progress lines (None: silent).

  Returns:
    The summary: ``name``, ``tfds_name``, ``path``, ``already_prepared``, ``image_copy``,
    ``splits`` ({split: {"images", "classes"}}) and ``skipped`` ({split: [paths]}).

  Raises:
    FileNotFoundError: input files missing (all named).
    ValueError: an unknown name, a damaged input file, or a split without images.
  """
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  key = builders.short_name(name)
  quality = check_copy_options(short_side, jpeg_quality)
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = builders.builder_class(key)(data_dir=data_dir, file_format="array_record")
  already = builder.is_prepared() and not overwrite
  if already:
    builders.check_copy(builder, short_side, data_dir)
  if not already:
    if not manual_dir:
      raise ValueError(f"--manual_dir is required to prepare {key}: the folder holding the "
                       f"downloaded files. {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    plan = builders.make_plan(key, manual_dir, scratch_dir=data_dir, workers=workers, log=log)
    plan.short_side, plan.quality, plan.workers = int(short_side), quality, workers or 0
    write(builder, plan, manual_dir, overwrite=overwrite, log=log)
    builder = builders.builder_class(key)(data_dir=data_dir)  # re-read what was written
  summary = builders.summarize(builder.info.metadata)
  return {"name": key, "tfds_name": builder.name, "path": os.fspath(builder.data_path),
          "already_prepared": already,
          "image_copy": dict(builder.info.metadata).get("image_copy", "full"), **summary}


def write(builder, plan, manual_dir: str, *, overwrite: bool,
          log: Optional[Callable[[str], None]] = None) -> None:
  """Writes ``plan`` through ``builder`` (TFDS renames its ``incomplete.*`` folder only once every
  record is written); closes the plan."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dmljax.data import builders  # pylint: disable=g-import-not-at-top
  scratch = builders._Scratch(os.fspath(builder.data_dir_root))  # pylint: disable=protected-access
  try:
    builder.plan = plan
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode,
                                          try_download_gcs=False)
    if log:
      copy = (f" (each image resized to shorter side {plan.short_side}, JPEG quality "
              f"{plan.quality})" if plan.short_side else "")
      log(f"{plan.name}: writing {builder.data_path}{copy}")
    builder.download_and_prepare(download_dir=os.path.join(scratch.path(), "downloads"),
                                 download_config=config)
  finally:
    builder.plan = None
    plan.close()
    scratch.cleanup()


def format_table(summary: dict) -> str:
  """The splits as a text table (images, classes, skipped)."""
  rows = [(split, s["images"], s["classes"], len(summary["skipped"].get(split, ())))
          for split, s in summary["splits"].items()]
  width = max(5, *(len(r[0]) for r in rows))
  lines = [f"{'split':<{width}}  {'images':>7}  {'classes':>7}  {'skipped':>7}"]
  lines += [f"{r[0]:<{width}}  {r[1]:>7d}  {r[2]:>7d}  {r[3]:>7d}" for r in rows]
  return "\n".join(lines)


def _show_warning(message, category, filename, lineno, file=None, line=None):
  del filename, lineno, line
  print(f"{PROG}: warning: {message}", file=file or sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Command-line entry point; returns the summary (so tests can call it in-process)."""
  a = parse_args(argv)
  if not a.data_dir:
    raise ValueError("--data_dir is required: the TFDS data folder to write to (e.g. "
                     "--data_dir=~/tensorflow_datasets).")
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS's info lines; our own progress is printed
  log = lambda text: print(text, flush=True)  # noqa: E731
  with warnings.catch_warnings():
    from dmljax.data import builders, own  # pylint: disable=g-import-not-at-top
    warnings.simplefilter("always", builders.SkippedImageWarning)
    warnings.showwarning = _show_warning
    if a.name in own.KINDS:
      summary = own.prepare(a.name, a.manual_dir, a.data_dir, name=a.own_name, layout=a.layout,
                            test_fraction=a.test_fraction, shuffle_seed=a.shuffle_seed,
                            overwrite=a.overwrite, workers=a.workers, short_side=a.short_side,
                            jpeg_quality=a.jpeg_quality, log=log)
    else:
      if not builders.is_benchmark(a.name):
        raise ValueError(f"Unknown data set {a.name!r}; valid names: {', '.join(builders.NAMES)}, "
                         f"or {' / '.join(own.KINDS)} for your own images (with --name=NAME).")
      given = [f"--{k}" for k in ("name", "layout", "test_fraction", "shuffle_seed")
               if getattr(a, "own_name" if k == "name" else k) is not None]
      if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for your "
                         f"own images (folder, csv), not for the benchmark {a.name}.")
      summary = prepare(a.name, a.manual_dir, a.data_dir, overwrite=a.overwrite,
                        workers=a.workers, short_side=a.short_side,
                        jpeg_quality=a.jpeg_quality, log=log)
  if summary["already_prepared"]:
    source = f" from {summary['manual_dir']}" if "manual_dir" in summary else ""
    print(f"{summary['tfds_name']} is already prepared in {summary['path']}{source}; nothing to "
          "do (--overwrite rebuilds it).")
  else:
    print(f"{summary['tfds_name']} prepared in {summary['path']}")
  if summary.get("image_copy", "full") != "full":
    print(f"image copy: {summary['image_copy']} (each image resized to that shorter side)")
  print(format_table(summary))
  if "kind" in summary:
    print(f"train on it: python -m dmljax.main --config=configs/own_data.py "
          f"--config.dataset.name={summary['name']} "
          f"--config.dataset.data_dir={summary['data_dir']}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"wrote {a.json}")
  return summary


def run(argv: Optional[Sequence[str]] = None) -> int:
  """``main`` with errors as one message (exit status 2) instead of a traceback."""
  return cli.run_main(PROG, main, argv)


if __name__ == "__main__":
  sys.exit(run())
