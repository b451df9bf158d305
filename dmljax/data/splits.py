"""Data set containers and train/validation/test splitting (class-disjoint or by image)."""
import dataclasses
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Split", "Dataset", "class_disjoint_split", "stratified_split", "partition_classes"]

SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a data set.

  Attributes:
    images: [N, H, W, C] float32 in [0, 1].
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
