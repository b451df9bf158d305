"""Data set containers and train/validation/test splitting (class-disjoint or by image)."""
import dataclasses
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Split", "QueryGallery", "Dataset", "class_disjoint_split", "stratified_split", "partition_classes",
           "PROTOCOL_NUM_FOLDS", "protocol_class_halves", "protocol_folds", "protocol_fold_dataset"]

SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a data set.

  Attributes:
    images: [N, H, W, C] float32 in [0, 1] or uint8 (the embedded data sets), or a record source
      of encoded images (the prepared benchmark data sets, :class:`dmljax.data.records.RecordSplit`)
      that the input pipeline decodes.
    labels: [N] int32, contiguous ``0 .. num_classes - 1`` within this split.
    class_ids: [num_classes] int32, the data set's original class id of each contiguous label
      (``class_ids[labels]`` recovers the original ids; equal ids across splits mean the same
      class).
    class_names: one readable name per contiguous label (e.g. "7", "A/Α/А").
  """
  images: np.ndarray
  labels: np.ndarray
  class_ids: np.ndarray
  class_names: tuple

  @property
  def num_classes(self) -> int:
    return len(self.class_ids)

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class QueryGallery:
  """An evaluation split searched query against gallery (In-shop): each query's neighbours are
  taken from the gallery only. The two share one label space (equal labels: the same class)."""
  query: Split
  gallery: Split

  @property
  def labels(self) -> np.ndarray:
    """The query labels (what the per-query metrics are averaged over)."""
    return self.query.labels

  @property
  def num_classes(self) -> int:
    return len(np.union1d(self.query.class_ids, self.gallery.class_ids))

  def __len__(self) -> int:
    return len(self.query) + len(self.gallery)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded data set: named splits plus metadata.

  Attributes:
    name: registry name ("digits", "digits_closed", "glyphs").
    splits: {"train", "val", "test"} -> :class:`Split`.
    image_shape: (H, W, C) of every image.
    info: free-form metadata (generation parameters, merged classes, cache file, ...).
  """
  name: str
  splits: Mapping[str, Split]
  image_shape: tuple
  info: Mapping = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> dict:
    """Classes per split."""
    return {k: s.num_classes for k, s in self.splits.items()}

  def __getitem__(self, split: str) -> Split:
    if split not in self.splits:
      raise ValueError(f"Data set {self.name!r} has no split {split!r}; splits: "
                       f"{list(self.splits)}.")
    return self.splits[split]


def _make_split(images, original_labels, class_names: Mapping[int, str], selected=None) -> Split:
  """Builds a Split with contiguous labels (ordered by original class id)."""
  if selected is not None:
    images, original_labels = images[selected], original_labels[selected]
  class_ids, labels = np.unique(original_labels, return_inverse=True)
  return Split(images=np.ascontiguousarray(images, np.float32), labels=labels.astype(np.int32),
               class_ids=class_ids.astype(np.int32),
               class_names=tuple(class_names[int(c)] for c in class_ids))


def class_disjoint_split(images, labels, class_groups: Mapping[str, Sequence[int]],
                         class_names: Mapping[int, str]) -> dict:
  """Splits by class: every image of a class goes to the split listing that class.

  Args:
    images: [N, ...] images.
    labels: [N] original class ids.
    class_groups: split name -> class ids; groups must be disjoint and non-empty.
    class_names: original class id -> readable name.

  Returns:
    split name -> :class:`Split`.
  """
  labels = np.asarray(labels)
  known = set(np.unique(labels).tolist())
  seen = set()
  for name, group in class_groups.items():
    group = set(int(c) for c in group)
    if not group:
      raise ValueError(f"Split {name!r} has no classes; give it at least one class.")
    if group - known:
      raise ValueError(f"Split {name!r} lists unknown classes {sorted(group - known)}; valid class "
                       f"ids: {sorted(known)}.")
    if group & seen:
      raise ValueError(f"Classes {sorted(group & seen)} are in more than one split; class-disjoint "
                       "splits need disjoint class lists.")
    seen |= group
  return {name: _make_split(images, labels, class_names, np.isin(labels, list(group)))
          for name, group in class_groups.items()}


def stratified_split(images, labels, fractions: Mapping[str, float], seed: int,
                     class_names: Mapping[int, str]) -> dict:
  """Splits by image, per class, so every split holds every class in the same proportions.

  Args:
    images: [N, ...] images.
    labels: [N] class ids.
    fractions: split name -> fraction of each class's images; must sum to 1 (the first split absorbs
      rounding). Every split gets at least one image of every class.
    seed: permutation seed.
    class_names: class id -> readable name.

  Returns:
    split name -> :class:`Split` (all with the same classes).
  """
  names = list(fractions)
  frac = np.array([fractions[n] for n in names], np.float64)
  if np.any(frac <= 0) or abs(frac.sum() - 1) > 1e-6:
    raise ValueError(f"Split fractions must be positive and sum to 1, got {dict(fractions)}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  assignment = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if len(members) < len(names):
      raise ValueError(f"Class {c} has {len(members)} images, fewer than the {len(names)} splits.")
    sizes = np.maximum(1, np.floor(frac * len(members)).astype(int))
    sizes[0] = len(members) - sizes[1:].sum()
    assignment[members] = np.repeat(np.arange(len(names)), sizes)
  return {n: _make_split(images, labels, class_names, assignment == i) for i, n in enumerate(names)}


def partition_classes(class_ids: Sequence[int], fractions: Mapping[str, float], seed: int) -> dict:
  """Randomly partitions classes into named groups of the given fractions (at least one each).

  Returns:
    split name -> sorted list of class ids; the first split absorbs rounding.
  """
  names = list(fractions)
  frac = np.array([fractions[n] for n in names], np.float64)
  class_ids = np.asarray(class_ids)
  if np.any(frac <= 0) or abs(frac.sum() - 1) > 1e-6:
    raise ValueError(f"Split fractions must be positive and sum to 1, got {dict(fractions)}.")
  if len(class_ids) < len(names):
    raise ValueError(f"Need at least {len(names)} classes for {len(names)} class-disjoint splits, "
                     f"got {len(class_ids)}.")
  perm = np.random.default_rng(seed).permutation(class_ids)
  sizes = np.maximum(1, np.round(frac * len(class_ids)).astype(int))
  sizes[0] = len(class_ids) - sizes[1:].sum()
  if sizes[0] < 1:
    raise ValueError(f"Too few classes ({len(class_ids)}) for fractions {dict(fractions)}.")
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  return {n: sorted(perm[bounds[i]:bounds[i + 1]].tolist()) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------- 4-fold protocol
# The class-disjoint cross-validation of Musgrave et al., "A metric learning reality check"
# (ECCV 2020), which CCP's tables follow. All classes sorted by id: the first half is train+val,
# the second half test; train+val is cut into ``num_folds`` class folds that wrap around.

PROTOCOL_NUM_FOLDS = 4


def protocol_class_halves(class_ids: Sequence[int]) -> tuple[list, list]:
  """``(train+val, test)`` class ids: the classes sorted by id, cut after the first half.

  With an odd number of classes the test half holds the extra class (the reference code keeps
  ``floor(C / 2)`` classes for train+val).
  """
  ids = sorted(set(int(c) for c in class_ids))
  half = len(ids) // 2
  return ids[:half], ids[half:]


#: How :func:`protocol_folds` cuts the classes: ``"even"`` (every fold validates on
#: ``n // num_folds`` classes; the default) or ``"authors"`` (the CCP authors' cut).
FOLD_CUTS = ("even", "authors")


def protocol_folds(trainval_ids: Sequence[int], num_folds: int = PROTOCOL_NUM_FOLDS,
                   cuts: str = "even") -> list:
  """The class folds over the train+val classes: one ``{"train": ids, "val": ids}`` per fold.

  With ``n`` classes sorted by id, fold ``p`` takes ``n // num_folds`` validation classes and
  the other ``n - n // num_folds`` for training. Its training classes start at sorted index
  ``floor(p * n / num_folds)`` and run on, wrapping from the last class to the first; its
  validation classes are the ones that follow. For 100 classes fold 0 trains on 0-74 and
  validates on 75-99, fold 1 trains on 25-99 and validates on 0-24; for 98 classes the folds
  start at 0, 24, 49 and 73 and validate on 24 classes each. The lists are sorted by id.

  ``cuts = "authors"``: the class blocks the CCP authors' code holds out for its models (sorted
  positions cut at ``b_j = floor(j * n / num_folds)``): fold ``p`` validates on
  ``[b_(p-1), b_p)`` (fold 0: ``[b_(K-1), n)``, the last block, which their first model holds
  out) and trains on the rest, so the validation blocks partition the classes and hold
  ``n // num_folds`` or one more. Fold ``p >= 1`` is their model ``K + 1 - p``. For 98 classes
  the cuts are 0, 24, 49, 73, 98: fold 0 validates on 73-97 (25 classes; ``"even"``: 74-97).
  When ``num_folds`` divides ``n`` both cuts give the same folds.
  """
  ids = sorted(set(int(c) for c in trainval_ids))
  n = len(ids)
  if num_folds < 2:
    raise ValueError(f"The protocol needs at least 2 folds, got num_folds={num_folds}.")
  if n < num_folds:
    raise ValueError(f"{num_folds} class folds need at least {num_folds} train+val classes, got "
                     f"{n}; use a data set with at least {2 * num_folds} classes.")
  if cuts not in FOLD_CUTS:
    raise ValueError(f"Unknown fold cut {cuts!r}; valid: {list(FOLD_CUTS)} (set "
                     "--config.dataset.options.fold_cuts).")
  if cuts == "authors":
    b = [j * n // num_folds for j in range(num_folds + 1)]
    folds = []
    for p in range(num_folds):
      lo, hi = (b[num_folds - 1], n) if p == 0 else (b[p - 1], b[p])
      folds.append({"train": ids[:lo] + ids[hi:], "val": ids[lo:hi]})
    return folds
  val_len = n // num_folds
  train_len = n - val_len
  folds = []
  for p in range(num_folds):
    start = p * n // num_folds
    train = sorted(ids[(start + i) % n] for i in range(train_len))
    val = sorted(ids[(start + train_len + i) % n] for i in range(val_len))
    folds.append({"train": train, "val": val})
  return folds


def protocol_fold_dataset(dataset: Dataset, fold: int,
                          num_folds: int = PROTOCOL_NUM_FOLDS, cuts: str = "even") -> Dataset:
  """``dataset`` re-split as fold ``fold`` of the protocol.

  The class pool is the union of the classes of all of ``dataset``'s splits (images of every
  split pooled under their original class ids, in split order), so the result does not depend
  on how ``dataset`` was split. Its splits are ``train`` and ``val`` (the fold's classes) and
  ``test`` (the second half of the classes, the same images in the same order for every fold).

  ``info`` keeps the source's entries, with per-split arrays (e.g. glyphs' ``fonts``) regrouped
  to the new splits; entries that describe the source's class split are replaced by
  ``info["protocol"]``: ``{"fold", "num_folds", "train_classes", "val_classes",
  "test_classes", "class_pool"}`` (original class ids).
  """
  num_folds = int(num_folds)
  if not 0 <= int(fold) < num_folds:
    raise ValueError(f"protocol fold {fold} is out of range; valid folds: 0..{num_folds - 1}.")
  fold = int(fold)
  names_in = list(dataset.splits)
  images = np.concatenate([np.asarray(dataset.splits[n].images) for n in names_in])
  labels = np.concatenate([
      np.asarray(dataset.splits[n].class_ids)[np.asarray(dataset.splits[n].labels)]
      for n in names_in]).astype(np.int64)
  class_names = {}
  for n in names_in:
    s = dataset.splits[n]
    class_names.update({int(c): name for c, name in zip(s.class_ids, s.class_names)})
  pool = sorted(class_names)
  trainval, test = protocol_class_halves(pool)
  groups = dict(protocol_folds(trainval, num_folds, cuts)[fold], test=test)
  new_splits = class_disjoint_split(images, labels, groups, class_names)

  sizes = {n: len(dataset.splits[n]) for n in names_in}
  info = {}
  for key, value in dict(dataset.info).items():
    if isinstance(value, Mapping) and set(value) == set(names_in):
      aligned = all(np.ndim(value[n]) >= 1 and len(value[n]) == sizes[n] for n in names_in)
      if aligned:
        pooled = np.concatenate([np.asarray(value[n]) for n in names_in])
        info[key] = {g: pooled[np.isin(labels, ids)] for g, ids in groups.items()}
      continue  # a per-split description of the source's class split: replaced below
    if key in ("train_classes", "val_classes", "test_classes"):
      continue
    info[key] = value
  info["protocol"] = {"fold": fold, "num_folds": num_folds, "train_classes": groups["train"],
                      "val_classes": groups["val"], "test_classes": groups["test"],
                      "class_pool": pool}
  return Dataset(name=dataset.name, splits=new_splits, image_shape=dataset.image_shape, info=info)
