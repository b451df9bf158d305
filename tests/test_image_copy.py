"""The short-side copy of a prepared data set and the input pipeline at accelerator rate.

* ``prepare --short_side``: every record of the copy is its full record resized to that shorter
  side (labels, order, boxes scaled by the exact factor), the metadata says which copy it is, and
  asking for the other copy where one is prepared is refused;
* a run records the copy it read (config.json, checkpoints) and refuses to resume on the other;
* batched record reads, workers by available cores, batches handed over in shared memory and
  PROFS-HNCM batches of a hold decoded ahead by a worker from the table the loop publishes.
"""
import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tinydata  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from dmljax import errors, inputs  # noqa: E402  pylint: disable=wrong-import-position
from dmljax.data import pipeline, prepare, records, transforms  # noqa: E402  pylint: disable=wrong-import-position

SHORT = 20  # the tiny photos are ~40 x 28: a real reduction


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cars"))
  kw = dict(train_classes=4, test_classes=2, per_class=3)
  return (root, tinydata.prepare_tiny("cars", root, **kw),
          tinydata.prepare_tiny("cars", root, short_side=SHORT, **kw))


def test_short_side_copy_records_and_refusals(copies):
  root, full_dir, small_dir = copies
  full, small = records.open_prepared("cars", full_dir), records.open_prepared("cars", small_dir)
  assert full.image_copy == "full" and small.image_copy == f"short_side_{SHORT}"
  assert small.metadata["short_side"] == SHORT and small.metadata["jpeg_quality"] == 95
  eval_cfg = transforms.TransformConfig(kind="eval", size=16, resize=SHORT)
  for split in ("train", "test"):
    a, b = full[split], small[split]
    assert b.image_copy == small.image_copy
    np.testing.assert_array_equal(a.labels, b.labels)
    for i in range(len(a)):
      ra, rb = a[i], b[i]
      assert ra["image_id"] == rb["image_id"] and ra["path"] == rb["path"]
      w, h = int(ra["width"]), int(ra["height"])
      # torchvision's Resize(SHORT): the shorter side SHORT, the longer int(SHORT * long / short)
      want = ((int(SHORT * w / h), SHORT) if h <= w else (SHORT, int(SHORT * h / w)))
      assert (int(rb["width"]), int(rb["height"])) == want
      assert transforms.image_size(rb["image"]) == (want[1], want[0])  # the file itself
      scale = np.array([want[0] / w, want[1] / h] * 2, np.float32)
      np.testing.assert_allclose(rb["bbox"], ra["bbox"] * scale, rtol=1e-6)
    # What the protocol's eval transform makes of both copies: close, not equal (JPEG q95 and
    # one resampling instead of the decoder's): a few grey levels on these noisy tiny photos.
    x = pipeline.load_batch(a, eval_cfg, np.arange(len(a))).astype(np.float32)
    y = pipeline.load_batch(b, eval_cfg, np.arange(len(b))).astype(np.float32)
    assert 0 < np.abs(x - y).mean() < 12, np.abs(x - y).mean()
  # The other copy where one is prepared: refused, naming both and the fix; a copy already
  # there is simply found again.
  manual = os.path.join(root, "manual")
  with pytest.raises(ValueError, match=r"holds its full-size images .* another --data_dir"):
    prepare.prepare("cars", manual, full_dir, short_side=SHORT)
  with pytest.raises(ValueError, match=r"shorter side 20 .* asks for its full-size images"):
    prepare.prepare("cars", manual, small_dir)
  again = prepare.prepare("cars", manual, small_dir, short_side=SHORT)
  assert again["already_prepared"] and again["image_copy"] == f"short_side_{SHORT}"
  for argv, match in ((["cars", "--manual_dir", manual, "--data_dir", full_dir,
                        "--jpeg_quality=90"], "--jpeg_quality is for the --short_side"),
                       (["cars", "--manual_dir", manual, "--data_dir", full_dir,
                         "--short_side=-1"], "--short_side must be an integer >= 0")):
    with pytest.raises(ValueError, match=match):
      prepare.main(argv)


def _config(data_dir, **extra):
  from dmljax.configs import ccp_paper_config, set_keys  # pylint: disable=g-import-not-at-top
  c = ccp_paper_config("cars", "small")
  c.dataset.data_dir = data_dir
  c.input.size, c.input.resize = 16, SHORT
  c.model.widths, c.model.embedding_dim = (4,), 4
  c.total_steps, c.eval_every_steps, c.log_every_steps = 2, 2, 2
  c.checkpoint.every_steps, c.checkpoint.save_best = 0, False
  c.baselines, c.progress, c.num_devices = (), False, 1
  c.framework = "standard"  # the cheapest run that writes a checkpoint
  set_keys(c, extra)
  return c


def test_run_records_its_copy_and_refuses_to_resume_on_the_other(copies, tmp_path):
  from dmljax import train  # pylint: disable=g-import-not-at-top
  _, full_dir, small_dir = copies
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(full_dir), workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["dataset"]["image_copy"] == "full"  # "auto", resolved
  # Going on (more steps) on the short-side copy: refused before anything is trained.
  with pytest.raises(errors.ConfigChanged) as e:
    train.train_and_evaluate(_config(small_dir, total_steps=4), workdir)
  text = str(e.value)
  assert "trained on its full-size images of 'cars'" in text and small_dir in text
  assert "Point --config.dataset.data_dir at the full copy" in text
  # A run that asks for a copy refuses the other one up front.
  with pytest.raises(ValueError, match="dataset.image_copy='short_side_20' but 'cars'"):
    inputs.create_input(_config(full_dir, **{"dataset.image_copy": f"short_side_{SHORT}"}))
  with pytest.raises(ValueError, match="input.resize=36 needs images with a shorter side"):
    inputs.create_input(_config(small_dir, **{"input.resize": 36}))
  # The checkpoint's host record says which copy the pipeline read.
  host = {"config": {"dataset": {"image_copy": "full", "data_dir": full_dir}}}
  small_cfg = inputs.resolve_image_copy(_config(small_dir), inputs.create_input(
      _config(small_dir)))
  assert small_cfg.dataset.image_copy == f"short_side_{SHORT}"
  inputs.check_image_copy({"config": {"dataset": {}}}, _config(full_dir), workdir)  # old runs
  with pytest.raises(errors.ConfigChanged):
    inputs.check_image_copy(host, small_cfg, workdir)


class _Spy:
  """A record source that counts its reads."""

  def __init__(self, split):
    self.split, self.reads, self.batched = split, 0, 0

  def __len__(self):
    return len(self.split)

  def __getitem__(self, i):
    self.reads += 1
    return self.split[i]

  def __getitems__(self, positions):
    self.batched += 1
    return self.split.__getitems__(positions)


def test_batched_reads_cores_and_hncm_holds_decoded_ahead(copies, monkeypatch):
  from dmljax.frameworks import profs  # pylint: disable=g-import-not-at-top
  from dmljax.data import samplers  # pylint: disable=g-import-not-at-top
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  _, full_dir, _ = copies
  split = records.open_prepared("cars", full_dir)["train"]
  cfg = transforms.TransformConfig(kind="train", size=16, resize=SHORT)
  # One batched read per batch; the same images as record-by-record reads.
  spy = _Spy(split)
  idx = np.array([3, 0, 5, 5])
  got = pipeline.load_batch(spy, cfg, idx, seed=1, step=2)
  assert (spy.batched, spy.reads) == (1, 0)
  want = np.stack([transforms.transform_record(split[int(i)], cfg,
                                               transforms.augment_rng(1, 2, j))
                   for j, i in enumerate(idx)])
  np.testing.assert_array_equal(got, want)
  # Workers: one per available core (the affinity mask), unless set.
  c = _config(full_dir, **{"input.num_workers": -1})
  data = inputs.create_input(c)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 7, 9, 11, 12, 13, 14})
  monkeypatch.setattr(inputs, "_cgroup_cpu_limit", lambda: None)
  assert inputs.input_workers(c, data) == 10  # no longer capped at 8
  monkeypatch.setattr(inputs, "_cgroup_cpu_limit", lambda: 3)  # docker --cpus=2.5
  assert inputs.input_workers(c, data) == 3
  monkeypatch.undo()
  assert inputs.input_workers(_config(full_dir, **{"input.num_workers": 2}), data) == 2
  # PROFS-HNCM: the batches of a hold come from a worker, computed from the table the loop
  # publishes at the hold's first step, handed over in shared memory without a copy.
  labels = split.labels
  sampler = samplers.ClassRepresentativeSampler(labels, 4, 2, hold_steps=3, seed=0)
  fn = profs.HNCMBatch(sampler, 0, 2, 0, 1)
  board = pipeline.HoldBoard()
  tables = {0: None, 1: np.array([[1], [0], [3], [2]], np.int32),
            2: np.array([[2], [3], [0], [1]], np.int32)}
  loader = pipeline.BatchLoader(split, cfg, 7, pipeline.HoldIndices(fn, board, 3),
                                num_workers=1, prefetch=2)
  with loader:
    for step in range(9):
      if step % 3 == 0:
        board.publish(step // 3, tables[step // 3])
      s, images, indices = next(loader)
      np.testing.assert_array_equal(indices, fn(step, tables[step // 3]))
      np.testing.assert_array_equal(
          images, pipeline.load_batch(split, cfg, indices, seed=7, step=step))
      assert not images.flags.owndata
      assert isinstance(images.base, shared_memory_array.SharedMemoryArray)
    directory = board.directory
  assert not os.path.exists(directory)  # the loader owned the board and removed it
  # The mined classes differ from the uniform ones once a table is there.
  assert any(not np.array_equal(fn(s, tables[1]), fn(s, None)) for s in range(3, 6))
