"""scikit-learn's bundled digits (1,797 8x8 images of 10 classes): no download needed.

Two variants:
  * ``digits`` — class-disjoint, in the spirit of the zero-shot protocol of Musgrave et al. used by
    CCP: the first seven digits form the training half and 7, 8, 9 are the test classes; the
    validation fold is carved from the training half as whole classes (5 and 6), so validation MAP@R
    measures generalisation to unseen classes exactly as the test does. Training therefore sees
    digits 0-4. ``val_classes`` / ``test_classes`` override the choice (the training classes are the
    rest).
  * ``digits_closed`` — all ten classes in every split, split by image per class (CCP's MNIST proof
    of concept), fractions ``train/val/test`` = 0.7/0.15/0.15 by default, permuted by ``seed``.

Pixels are scaled from 0..16 to [0, 1]; images are [N, 8, 8, 1] float32.
"""
import numpy as np

from dmljax.data.splits import Dataset, class_disjoint_split, stratified_split

__all__ = ["load_digits", "load_digits_closed", "raw_digits"]

DEFAULT_VAL_CLASSES = (5, 6)
DEFAULT_TEST_CLASSES = (7, 8, 9)


def raw_digits():
  """All 1,797 images ([N, 8, 8, 1] float32 in [0, 1]) and labels ([N] int32 digit)."""
  from sklearn import datasets  # local import: only the digits loaders need scikit-learn
  bunch = datasets.load_digits()
  images = (bunch.images.astype(np.float32) / 16.0)[..., None]
  return images, bunch.target.astype(np.int32)


_NAMES = {d: str(d) for d in range(10)}


def load_digits(*, seed=0, val_classes=DEFAULT_VAL_CLASSES, test_classes=DEFAULT_TEST_CLASSES):
  """Class-disjoint digits: train / val / test hold different digits.

  Args:
    seed: unused (the class split is fixed so results are comparable across seeds); kept for the
      common ``load_dataset`` signature.
    val_classes: digits of the validation fold (carved from the training half).
    test_classes: digits of the test split.

  Returns:
    A :class:`Dataset` with splits train/val/test.
  """
  del seed
  images, labels = raw_digits()
  val, test = [int(c) for c in val_classes], [int(c) for c in test_classes]
  train = [d for d in range(10) if d not in set(val) | set(test)]
  splits = class_disjoint_split(images, labels, {"train": train, "val": val, "test": test}, _NAMES)
  return Dataset(name="digits", splits=splits, image_shape=(8, 8, 1),
                 info={"train_classes": train, "val_classes": val, "test_classes": test})


def load_digits_closed(*, seed=0, val_fraction=0.15, test_fraction=0.15):
  """Closed-set digits: every digit in every split, images split per class by ``seed``."""
  images, labels = raw_digits()
  if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
    raise ValueError(f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                     f"{val_fraction} and {test_fraction}.")
  fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction,
               "test": test_fraction}
  splits = stratified_split(images, labels, fractions, seed, _NAMES)
  return Dataset(name="digits_closed", splits=splits, image_shape=(8, 8, 1),
                 info={"fractions": fractions, "seed": seed})
