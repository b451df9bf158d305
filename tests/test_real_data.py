"""The trainer on prepared benchmark data (tiny data sets in the exact file layouts).

* a CCP run on CUB-like records with augmentation, decoded in 2 worker processes, stopped by a
  preemption after step 4 and resumed, ends exactly as the uninterrupted run (same batches,
  same augmentation, same metrics);
* In-shop is evaluated query against gallery, equal to the metrics computed by hand from the
  embeddings of the two sets;
* a data set that was never prepared fails with one line that gives the prepare command.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import preempt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import tinydata  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from dmljax import train  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from dmljax.configs import ccp_paper_config, set_keys  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def cub_dir(tmp_path_factory):
  return tinydata.prepare_tiny("cub", str(tmp_path_factory.mktemp("cub")), train_classes=10,
                               test_classes=4, per_class=4)


def _cub_config(data_dir, **extra):
  c = ccp_paper_config("cub", "small")
  c.dataset.data_dir = data_dir
  c.total_steps, c.eval_every_steps, c.log_every_steps = 8, 4, 4
  c.checkpoint.every_steps = 0
  c.progress, c.num_devices = False, 1
  c.input.num_workers, c.input.prefetch = 2, 3
  set_keys(c, extra)
  return c


def _final(out):
  return {k: v for k, v in out.items() if k.startswith(("val/", "test/", "untrained/"))}


def test_records_with_workers_resume_exactly(cub_dir, tmp_path, monkeypatch):
  ref = train.train_and_evaluate(_cub_config(cub_dir), str(tmp_path / "ref"))
  assert ref["step"] == 8 and ref["nonfinite_steps"] == 0
  assert "pixels/test/map_at_r" not in ref  # not a baseline for photos

  disarm = preempt.stop_after(monkeypatch, train, train.frameworks.Framework, 5)
  workdir = str(tmp_path / "run")
  out = train.train_and_evaluate(_cub_config(cub_dir), workdir)
  assert out == {"preempted": True, "step": 5}
  disarm()
  resumed = train.train_and_evaluate(_cub_config(cub_dir), workdir)
  assert _final(resumed) == _final(ref)
  # The same run decoded in this process (no workers) is the same run.
  inline = train.train_and_evaluate(_cub_config(cub_dir, **{"input.num_workers": 0}),
                                    str(tmp_path / "inline"))
  assert _final(inline) == _final(ref)


def test_augmentation_changes_the_run(cub_dir, tmp_path):
  """Train-time augmentation is on by default and really reaches the step."""
  a = train.train_and_evaluate(_cub_config(cub_dir, **{"input.num_workers": 0}),
                               str(tmp_path / "a"))
  b = train.train_and_evaluate(_cub_config(cub_dir, **{"input.num_workers": 0,
                                                       "input.augment": False}),
                               str(tmp_path / "b"))
  assert a["untrained/test/map_at_r"] == b["untrained/test/map_at_r"]  # same start
  losses = [[r["loss"] for r in train.read_jsonl(str(tmp_path / d / "metrics.jsonl"))
             if r["kind"] == "train"] for d in ("a", "b")]
  assert len(losses[0]) == len(losses[1]) == 2
  assert losses[0] != losses[1]  # other pixels reached the step
  # And the augmented run is reproducible.
  again = train.train_and_evaluate(_cub_config(cub_dir, **{"input.num_workers": 0}),
                                   str(tmp_path / "again"))
  assert _final(again) == _final(a)


def test_inshop_is_evaluated_query_against_gallery(tmp_path):
  from dmljax import metrics  # pylint: disable=g-import-not-at-top
  data_dir = tinydata.prepare_tiny("inshop", str(tmp_path / "inshop"))
  c = ccp_paper_config("inshop", "small")
  c.dataset.data_dir = data_dir
  c.progress, c.num_devices, c.checkpoint.enabled = False, 1, False
  c.total_steps = c.eval_every_steps = 2
  captured = {}

  def keep(name, emb, split):
    captured[name] = (emb, split)

  out = train.train_and_evaluate(c, str(tmp_path / "run"), on_final_embeddings=keep)
  emb, split = captured["test"]
  nq = len(split.query)
  assert emb.shape[0] == nq + len(split.gallery)
  want = metrics.retrieval_metrics(emb[:nq], split.query.labels, gallery_embeddings=emb[nq:],
                                   gallery_labels=split.gallery.labels)
  assert out["test/map_at_r"] == pytest.approx(want["map_at_r"])
  assert out["test/num_queries"] == nq == 6


def test_dataset_not_prepared_gives_the_command(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("DMLJAX_VERBOSE", None)
  p = subprocess.run(
      [sys.executable, "-m", "dmljax.main", f"--config={ROOT}/configs/sop_ccp.py:small",
       f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'nothing'}"],
      capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr
  lines = [line for line in p.stderr.splitlines()
           if line.startswith("python -m dmljax.main: error:")]
  assert len(lines) == 1, p.stderr
  assert "python -m dmljax.data.prepare sop --manual_dir=" in lines[0]
  assert str(tmp_path / "nothing") in lines[0]


@pytest.mark.parametrize("variant,num_val", [("small", 3), ("ablation", 4)])
def test_paper_configs_validate_on_protocol_fold_0(cub_dir, variant, num_val):
  # Issue 18: single runs validate on 1/4 of the training classes, the protocol's fold 0 (the
  # last quarter by class id); the ablation variant on 1/3 (fold 0 of a 3-fold cut). Cut as the
  # authors cut (floor(j n / K)): 11 classes -> the last 3 (of 4 folds) or 4 (of 3).
  from dmljax import protocol  # pylint: disable=g-import-not-at-top
  from dmljax.data import splits  # pylint: disable=g-import-not-at-top
  c = ccp_paper_config("cub", variant)
  c.dataset.data_dir = cub_dir
  data = train.create_input(c)
  ids = sorted(int(i) for i in data.train.class_ids) + sorted(int(i) for i in data.val.class_ids)
  assert c.dataset.options.fold_cuts == "authors"
  folds = splits.protocol_folds(ids, 3 if variant == "ablation" else 4, cuts="authors")
  assert sorted(int(i) for i in data.val.class_ids) == folds[0]["val"] == ids[-num_val:]
  assert sorted(int(i) for i in data.train.class_ids) == folds[0]["train"] == ids[:-num_val]
  # The protocol itself stays 4-fold whatever the variant.
  assert protocol.fold_config(c, 1).dataset.options.num_folds == 4
  data1 = train.create_input(protocol.fold_config(c, 1))
  assert sorted(int(i) for i in data1.val.class_ids) == splits.protocol_folds(ids, 4)[1]["val"]
