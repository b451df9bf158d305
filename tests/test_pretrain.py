"""The glyphs pretraining (``python -m dmljax.pretrain``) and its weights through ``model.pretrained``.

A short version of the command that made the shipped weights (one Unicode block, 8 classes, a
tiny trunk, 60 steps) must learn, keep look-alikes of the glyphs letters out, write a file the
PyTorch reader loads, and that file must reach a training run through ``model.pretrained``, whose
final table then shows the pretrained trunk and the randomly initialised network side by side.
The shipped file must fit the glyphs configs' model and match its record.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import models, pretrain, train
from dmljax.configs import base_config, shrink
from dmljax.models import torch_import


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DMLJAX_WEIGHTS_CACHE", str(tmp_path / "weights_cache"))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pretrain") / "tiny.pth")
  status = pretrain.main(["--out", out, "--blocks=hebrew", "--max_classes=8",
                          "--samples_per_class=16", "--steps=60", "--widths=8,16,32",
                          "--batch_size=32", "--learning_rate=1e-2", "--holdout=4"])
  assert status == 0
  with open(out + ".json", encoding="utf-8") as f:
    return out, json.load(f)


def test_short_pretraining_learns_and_keeps_lookalikes_out(tiny_weights):
  path, record = tiny_weights
  sel = record["selection"]
  assert sel["classes"] == 8 and record["blocks"] == ["hebrew"]
  # Hebrew het renders as Cyrillic pe in most faces: the merge rule must drop it.
  assert "\u05d7~\u043f" in sel["lookalikes"]
  assert "\u05d7" not in record["classes"]
  assert record["last_loss"] < 0.5 * record["first_loss"], record
  assert record["heldout_accuracy"] > 0.3, record          # chance: 1/8 (32 held out)
  assert record["sha256"] == torch_import.file_sha256(path)
  sd = torch_import.load_state_dict(path)
  assert sd["Conv.0.weight"].shape == (8, 1, 3, 3) and sd["classifier.weight"].shape == (8, 32)


def test_state_dict_writer_round_trip_and_is_byte_stable(tmp_path):
  rng = np.random.default_rng(0)
  sd = {"a.weight": rng.normal(size=(3, 2, 3, 3)).astype(np.float32),
        "a.bias": rng.normal(size=(3,)), "n": np.arange(5, dtype=np.int64)}
  p1, p2 = str(tmp_path / "1.pth"), str(tmp_path / "2.pth")
  torch_import.save_state_dict(sd, p1)
  torch_import.save_state_dict(sd, p2)
  back = torch_import.load_state_dict(p1)
  assert list(back) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v)
    assert back[k].dtype == v.dtype
  assert open(p1, "rb").read() == open(p2, "rb").read()


def test_weights_reach_a_run_through_model_pretrained(tiny_weights, tmp_path):
  path, _ = tiny_weights
  c = shrink(base_config())                      # digits
  c.model.widths = (8, 16, 32)
  c.model.pretrained = path
  c.model.freeze_bn = "stats_and_affine"
  c.batch_size, c.sampler.m = 8, 4               # digits trains on 5 classes
  c.total_steps, c.eval_every_steps, c.log_every_steps = 4, 4, 2
  c.progress, c.num_devices, c.checkpoint.enabled = False, 1, False
  c.baselines = ("untrained", "pixels")
  # The trunk the run starts from is the file's, converted from PyTorch layout.
  model = models.get_model(c.model)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
  loaded = models.load_pretrained(c.model, init)
  sd = torch_import.load_state_dict(path)
  np.testing.assert_array_equal(loaded["params"]["backbone"]["Conv_1"]["kernel"],
                                sd["Conv.1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["BatchNorm_0"]["var"],
                                sd["BatchNorm.0.running_var"])
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  lines = {line.split()[0] for line in out["table"].strip().splitlines()[1:]}
  assert lines == {"trained", "pretrained", "random", "pixels"}, out["table"]
  assert out["untrained/val/map_at_r"] != out["random_init/val/map_at_r"]


def test_shipped_weights_fit_the_glyphs_configs_and_their_record():
  from configs import glyphs_ccp  # pylint: disable=g-import-not-at-top
  c = glyphs_ccp.get_config()
  assert c.model.pretrained == pretrain.shipped_weights() and os.path.isfile(c.model.pretrained)
  with open(c.model.pretrained + ".json", encoding="utf-8") as f:
    record = json.load(f)
  assert record["sha256"] == torch_import.file_sha256(c.model.pretrained)
  model = models.get_model(c.model)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                                           train=False))
  loaded = models.load_pretrained(c.model, jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), init))
  assert loaded["params"]["backbone"]["Conv_2"]["kernel"].shape == (3, 3, 64, 128)
  assert float(jnp.abs(loaded["params"]["backbone"]["Conv_0"]["kernel"]).sum()) > 0
