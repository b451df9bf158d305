"""Data sets that ship with the package (no download) and host-side batch samplers.

``load_dataset(name, seed=..., cache_dir=..., **options)`` returns a :class:`Dataset` whose splits
("train", "val", "test") hold float32 images in [0, 1] shaped [N, H, W, C] and int32 labels that are
contiguous (0 .. C-1) within each split; ``Split.class_ids`` maps them back to the data set's class
ids. Registered names:

  * ``digits``: scikit-learn's 8x8 digits, class-disjoint (train 0-4, val 5-6, test 7-9).
  * ``digits_closed``: the same images, all classes in every split, split by image.
  * ``glyphs``: letters of three alphabets rendered from matplotlib's fonts, class-disjoint.
  * ``cub``, ``cars``, ``sop``, ``inshop``: the benchmark data sets, once prepared with
    ``python -m dmljax.data.prepare NAME --manual_dir=... --data_dir=...`` (:mod:`dmljax.data.real`;
    option ``data_dir``, else ``$TFDS_DATA_DIR``); their splits hold records, not arrays.

The option ``protocol_fold=k`` (any data set) replaces the data set's own split by fold ``k`` of
the 4-fold class-disjoint protocol of Musgrave et al. (:func:`splits.protocol_fold_dataset`;
``python -m dmljax.protocol`` sets it through ``config.dataset.options``).
"""
from dmljax.data import digits, glyphs, real, samplers, splits
from dmljax.data.samplers import (ClassRepresentativeSampler, MPerClassSampler, OnePerClassSampler,
                                  profs_hold_steps)
from dmljax.data.splits import Dataset, QueryGallery, Split

__all__ = [
    "DATASETS", "Dataset", "QueryGallery", "Split", "load_dataset", "MPerClassSampler", "OnePerClassSampler",
    "ClassRepresentativeSampler", "profs_hold_steps",
]


def _digits(seed, cache_dir, **options):
  del cache_dir  # bundled with scikit-learn: nothing to cache
  return digits.load_digits(seed=seed, **options)


def _digits_closed(seed, cache_dir, **options):
  del cache_dir
  return digits.load_digits_closed(seed=seed, **options)


def _glyphs(seed, cache_dir, **options):
  return glyphs.load_glyphs(seed=seed, cache_dir=cache_dir, **options)


def _real(name):
  def load(seed, cache_dir, protocol_fold=None, **options):
    del cache_dir  # the prepared records are read in place
    return real.load_prepared(name, seed=seed, protocol_fold=protocol_fold, **options)
  return load


#: name -> loader(seed, cache_dir, **options).
DATASETS = {"digits": _digits, "digits_closed": _digits_closed, "glyphs": _glyphs,
            **{name: _real(name) for name in real.REAL_DATASETS}}


def load_dataset(name: str, *, seed: int = 0, cache_dir=None, **options) -> Dataset:
  """Loads a registered data set.

  Args:
    name: one of ``DATASETS``.
    seed: split seed (class partition for glyphs, image partition for digits_closed; the digits
      class split is fixed).
    cache_dir: where generated data are cached (glyphs only).
    **options: data-set specific keyword options (see each loader); unknown ones raise ValueError.
      ``protocol_fold`` (int, every data set) is not the loader's: the loaded data set is
      re-split as that fold of the 4-fold protocol (:func:`splits.protocol_fold_dataset`), or
      of a ``num_folds``-fold cut (e.g. 3: validation on 1/3 of the train+val classes, the CCP
      paper's single-model ablations); ``fold_cuts`` (:data:`splits.FOLD_CUTS`) picks how the
      classes are cut; ``num_folds`` and ``fold_cuts`` without ``protocol_fold`` are ignored.

  Returns:
    A :class:`Dataset`.
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown data set {name!r}; valid data sets: {sorted(DATASETS)}.")
  fold = options.pop("protocol_fold", None)
  num_folds = int(options.pop("num_folds", splits.PROTOCOL_NUM_FOLDS))
  cuts = str(options.pop("fold_cuts", "even"))
  if name in real.REAL_DATASETS:  # folds over the prepared training classes, test kept
    options["protocol_fold"], fold = fold, None
    options["num_folds"], options["fold_cuts"] = num_folds, cuts
  try:
    dataset = DATASETS[name](seed, cache_dir, **options)
  except TypeError as e:  # unexpected keyword: report it as a configuration error
    if "unexpected keyword" not in str(e):
      raise
    raise ValueError(f"Bad option for data set {name!r}: {e}.") from e
  if fold is None:
    return dataset
  return splits.protocol_fold_dataset(dataset, fold, num_folds, cuts)
