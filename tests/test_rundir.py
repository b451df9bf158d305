"""The run directory: remote metrics logs written as rolling parts (never the whole file per
line), merged on close and on resume; the persistent compilation cache's default folder."""
import os

import jax
import ml_collections

from dmljax import rundir


def test_remote_log_writes_parts_not_the_whole_file(tmp_path, monkeypatch):
  monkeypatch.setattr(rundir, "is_remote", lambda path: True)  # a bucket, through etils.epath
  monkeypatch.setattr(rundir, "REMOTE_FLUSH_SECONDS", 1e9)
  writes = []
  real = rundir.write_atomic
  monkeypatch.setattr(rundir, "write_atomic", lambda p, t: (writes.append(p), real(p, t)))
  workdir = str(tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  log = rundir.Logger(workdir, None)
  for step in (1, 2, 3):
    log.log(step, {"loss": 1.0 / step})
  assert writes == [] and rundir.read_jsonl(path) == []  # buffered: nothing written per line
  log.log(3, {"map_at_r": 0.5}, kind="eval")  # evaluations are written at once
  assert len(writes) == 1 and writes[0].endswith("part-000001.jsonl")
  assert [r["step"] for r in rundir.read_jsonl(path)] == [1, 2, 3, 3]
  log.log(4, {"loss": 0.2})
  log.close()  # the last lines, then one merged object
  assert not os.path.exists(rundir.parts_dir(path)) or not os.listdir(rundir.parts_dir(path))
  assert [r["step"] for r in rundir.read_jsonl(path)] == [1, 2, 3, 3, 4]
  # A run resumed from step 2 drops what came after it; a part left by a killed run included.
  killed = rundir.Logger(workdir, 4)
  killed.log(5, {"loss": 0.1}, kind="eval")
  resumed = rundir.Logger(workdir, 2)
  assert [r["step"] for r in rundir.read_jsonl(path)] == [1, 2]
  resumed.close()


def test_compilation_cache_default_is_per_user(monkeypatch, tmp_path):
  monkeypatch.setenv("DMLJAX_CACHE_DIR", str(tmp_path / "c"))
  assert rundir.compilation_cache_dir("auto") == str(tmp_path / "c" / "jax")
  assert rundir.compilation_cache_dir("") == ""
  old = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    cfg = ml_collections.ConfigDict({"compilation_cache": "auto"})
    assert rundir.enable_compilation_cache(cfg) == str(tmp_path / "c" / "jax")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c" / "jax")
    # A cache the user set wins.
    cfg.compilation_cache = str(tmp_path / "other")
    assert rundir.enable_compilation_cache(cfg) == str(tmp_path / "c" / "jax")
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def test_config_changes_shipped_weights_by_name_and_added_keys():
  """A run recorded by another installation of dmljax (its shipped weights at another path) or
  before a key was added (the key at its neutral value) resumes; real changes are still named."""
  from dmljax import pretrain, rundir
  here = pretrain.shipped_weights()
  saved = {"seed": 0, "model": {"pretrained": "/elsewhere/venv/site-packages/dmljax/weights/"
                                               "small_cnn_glyphs.pth"},
           "eval_knn": {"k": 5}}
  current = {"seed": 0, "model": {"pretrained": here},
             "eval_knn": {"k": 5, "approx_recall": 0.0}}
  assert rundir.config_changes(saved, current) == {}
  # Another file, a file outside the package's weights folder, a non-neutral new value, and a
  # real change are named.
  current["model"]["pretrained"] = here.replace("small_cnn_glyphs", "other")
  current["eval_knn"]["approx_recall"] = 0.95
  current["seed"] = 1
  assert set(rundir.config_changes(saved, current)) == {
      "model.pretrained", "eval_knn.approx_recall", "seed"}
  saved["model"]["pretrained"] = "/data/weights/small_cnn_glyphs.pth"
  current["model"]["pretrained"] = here
  assert "model.pretrained" in rundir.config_changes(saved, current)
  # A key that disappeared is a change too.
  assert rundir.config_changes({"eval_knn": {"approx_recall": 0.0}}, {"eval_knn": {}}) == {
      "eval_knn.approx_recall": (0.0, "<absent>")}
