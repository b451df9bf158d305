"""The 4-fold class-disjoint protocol (dmljax.protocol) and the markdown tables (dmljax.report)."""
import json
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from dmljax import metrics as metrics_lib
from dmljax import protocol
from dmljax import report
from dmljax import errors, train
from dmljax.data import Dataset, Split, load_dataset
from dmljax.data import splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"{ROOT}/configs/digits_ccp.py:small"
# Tiny CCP on digits: 8 steps, one evaluation and one checkpoint at the end. Digits' train+val
# half is 0-4, so a fold trains on 4 digits (4 x 8 = 32 a batch) and validates on one.
OVERRIDES = {"framework": "standard", "total_steps": 8, "eval_every_steps": 4,
             "checkpoint.every_steps": 8, "log_every_steps": 8, "batch_size": 32,
             "sampler.m": 8, "baselines": "()", "progress": False, "num_devices": 1}


def _config(**extra):
  from configs import digits_ccp  # pylint: disable=g-import-not-at-top
  from dmljax.configs import set_keys  # pylint: disable=g-import-not-at-top
  c = digits_ccp.get_config("small")
  return set_keys(c, {k: () if v == "()" else v for k, v in {**OVERRIDES, **extra}.items()})


def _read(path):
  with open(path) as f:
    return json.load(f)


# ============================================================================= fold rule


def _expected(n, p):
  """The rule spelled out: train from floor(p n / 4), wrapping, n - n // 4 classes; val next."""
  start, val_len = int(np.floor(p * n / 4)), n // 4
  order = [(start + i) % n for i in range(n)]
  return sorted(order[:n - val_len]), sorted(order[n - val_len:])


@pytest.mark.parametrize("n", [100, 98, 5, 66])
def test_folds_follow_the_rule(n):
  folds = splits.protocol_folds(range(n))
  assert len(folds) == 4
  for p, f in enumerate(folds):
    train_ids, val_ids = _expected(n, p)
    assert (f["train"], f["val"]) == (train_ids, val_ids), p
    assert not set(f["train"]) & set(f["val"])                # class-disjoint
    assert sorted(f["train"] + f["val"]) == list(range(n))    # together: all of train+val
    assert len(f["val"]) == n // 4


def test_folds_cub_and_cars_examples():
  cub = splits.protocol_folds(range(100))
  assert cub[0] == {"train": list(range(0, 75)), "val": list(range(75, 100))}
  assert cub[1] == {"train": list(range(25, 100)), "val": list(range(0, 25))}
  assert cub[2] == {"train": list(range(0, 25)) + list(range(50, 100)), "val": list(range(25, 50))}
  assert cub[3] == {"train": list(range(0, 50)) + list(range(75, 100)), "val": list(range(50, 75))}
  cars = splits.protocol_folds(range(98))                     # starts 0, 24, 49, 73; 74 + 24
  assert cars[0] == {"train": list(range(0, 74)), "val": list(range(74, 98))}
  assert cars[1] == {"train": list(range(24, 98)), "val": list(range(0, 24))}
  assert cars[2] == {"train": list(range(0, 25)) + list(range(49, 98)), "val": list(range(25, 49))}
  assert cars[3] == {"train": list(range(0, 49)) + list(range(73, 98)), "val": list(range(49, 73))}
  # The rule works on positions in the sorted ids, not on the id values.
  ids = [7 + 3 * i for i in range(98)]
  assert splits.protocol_folds(ids[::-1])[2] == {
      "train": [ids[i] for i in cars[2]["train"]], "val": [ids[i] for i in cars[2]["val"]]}
  assert splits.protocol_class_halves(range(200)) == (list(range(100)), list(range(100, 200)))
  assert splits.protocol_class_halves(range(7)) == ([0, 1, 2], [3, 4, 5, 6])
  with pytest.raises(ValueError, match="at least 4 train\\+val classes"):
    splits.protocol_folds(range(3))


def _authors_held_out(n, model, k=4):
  """The classes the CCP authors' code holds out for its model ``model`` (1-based) of ``k``:
  block ``k - model`` of the sorted positions cut at ``int(j * n / k)`` (float, then truncated)."""
  cuts = [int(j * n / k) for j in range(k + 1)]
  return list(range(cuts[k - model], cuts[k - model + 1]))


@pytest.mark.parametrize("n", [100, 98, 11318, 3997, 9])
def test_authors_fold_cuts_hold_out_the_authors_blocks(n):
  folds = splits.protocol_folds(range(n), cuts="authors")
  # Fold 0 = the authors' first model's block; folds 1..3 = their models 4, 3, 2.
  assert [f["val"] for f in folds] == [_authors_held_out(n, m) for m in (1, 4, 3, 2)]
  for f in folds:
    assert f["train"] == sorted(set(range(n)) - set(f["val"]))
  assert sorted(sum((f["val"] for f in folds), [])) == list(range(n))   # a partition
  assert [f["val"] for f in splits.protocol_folds(range(n), 3, cuts="authors")] == [
      _authors_held_out(n, m, 3) for m in (1, 3, 2)]
  if n % 4 == 0:
    assert folds == splits.protocol_folds(range(n))
  if n == 98:   # Cars: the authors hold out 73-97; the even cut 74-97
    assert folds[0]["val"] == list(range(73, 98))
    assert splits.protocol_folds(range(98))[0]["val"] == list(range(74, 98))
  with pytest.raises(ValueError, match="Unknown fold cut"):
    splits.protocol_folds(range(n), cuts="linspace")


def _toy_dataset():
  """Three class-disjoint splits with shuffled ids and a per-split info array (as glyphs' fonts)."""
  rng = np.random.default_rng(0)
  parts = {"train": [11, 3, 8, 0, 5], "val": [14, 1, 9], "test": [2, 13, 6, 7, 4, 10, 12, 15]}
  out, fonts = {}, {}
  for name, ids in parts.items():
    labels = np.repeat(np.arange(len(ids)), 3)
    cls = np.asarray(sorted(ids), np.int32)
    images = (cls[labels][:, None, None, None] + rng.random((len(labels), 2, 2, 1))).astype(
        np.float32)
    out[name] = Split(images=images, labels=labels.astype(np.int32), class_ids=cls,
                      class_names=tuple(f"c{c}" for c in cls))
    fonts[name] = cls[labels] * 10   # a per-image value that follows the image's class
  return Dataset(name="toy", splits=out, image_shape=(2, 2, 1),
                 info={"fonts": fonts, "class_groups": parts, "cache_file": "x.npz"})


def test_fold_dataset_pools_every_split():
  ds = _toy_dataset()
  tests = []
  for k in range(4):
    f = splits.protocol_fold_dataset(ds, k)
    expected = splits.protocol_folds(range(8))[k]
    assert f.splits["train"].class_ids.tolist() == expected["train"]
    assert f.splits["val"].class_ids.tolist() == expected["val"]
    assert f.splits["test"].class_ids.tolist() == list(range(8, 16))
    assert sum(len(s) for s in f.splits.values()) == sum(len(s) for s in ds.splits.values())
    for name, s in f.splits.items():
      original = s.class_ids[s.labels]
      # The image still belongs to its class (its pixels encode the id), so do the regrouped fonts.
      np.testing.assert_array_equal(np.floor(s.images[:, 0, 0, 0]).astype(int), original)
      np.testing.assert_array_equal(f.info["fonts"][name], original * 10)
      assert s.class_names == tuple(f"c{c}" for c in s.class_ids)
    assert f.info["protocol"] == {"fold": k, "num_folds": 4, "train_classes": expected["train"],
                                  "val_classes": expected["val"],
                                  "test_classes": list(range(8, 16)),
                                  "class_pool": list(range(16))}
    assert "class_groups" not in f.info and f.info["cache_file"] == "x.npz"
    tests.append(f.splits["test"])
  for t in tests[1:]:                                         # the same test set in every fold
    np.testing.assert_array_equal(t.images, tests[0].images)
    np.testing.assert_array_equal(t.labels, tests[0].labels)
  with pytest.raises(ValueError, match="fold 4 is out of range"):
    splits.protocol_fold_dataset(ds, 4)


def test_load_dataset_protocol_fold_option_on_digits():
  plain = load_dataset("digits")
  assert plain.splits["val"].class_ids.tolist() == [5, 6]     # the data set's own split unchanged
  fold1 = load_dataset("digits", protocol_fold=1)
  assert fold1.splits["train"].class_ids.tolist() == [1, 2, 3, 4]
  assert fold1.splits["val"].class_ids.tolist() == [0]
  assert fold1.splits["test"].class_ids.tolist() == [5, 6, 7, 8, 9]
  assert sum(len(s) for s in fold1.splits.values()) == 1797
  cfg = _config()
  classes = protocol.class_folds(cfg)
  assert classes["pool"] == list(range(10)) and classes["test"] == [5, 6, 7, 8, 9]
  assert protocol.fold_config(cfg, 2).dataset.options.protocol_fold == 2
  assert "protocol_fold" not in cfg.dataset.options            # the given config is not changed


def test_concatenation_matches_numpy():
  rng = np.random.default_rng(1)
  embs = [rng.normal(size=(50, 16)) * rng.uniform(0.1, 5.0, size=(50, 1)) for _ in range(4)]
  got = protocol.concatenate_embeddings(embs)
  unit = [e / np.sqrt((e ** 2).sum(1, keepdims=True)) for e in embs]
  cat = np.hstack(unit)
  want = cat / np.sqrt((cat ** 2).sum(1, keepdims=True))
  assert got.shape == (50, 64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(want, np.hstack(unit) / 2.0, rtol=1e-6)  # 4 unit parts: norm 2


# ============================================================================= orchestration


def _fake_train(calls, seed_of_fold=None):
  """A stand-in for train_and_evaluate: fixed metrics per fold, random test embeddings."""

  def fake(config, workdir, *, allow_config_change=False, on_final_embeddings=None):
    del allow_config_change
    k = int(config.dataset.options.protocol_fold)
    calls.append(k)
    ds = load_dataset("digits", protocol_fold=k)
    test = ds.splits["test"]
    emb = np.random.default_rng(k if seed_of_fold is None else seed_of_fold).normal(
        size=(len(test), 8)).astype(np.float32)
    on_final_embeddings("val", emb[:3], ds.splits["val"])
    on_final_embeddings("test", emb, test)
    final = {"step": 8, "best_step": 4, "test/map_at_r": 0.1 * (k + 1),
             "test/precision_at_1": 0.5, "val/map_at_r": 1.0, "untrained/test/map_at_r": 0.0}
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f)
    return final

  return fake


def test_orchestration_layout_skip_and_config_check(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train(calls))
  workdir = str(tmp_path / "proto")
  cfg = _config()
  out = protocol.run_protocol(cfg, workdir, folds=[0, 2])
  assert calls == [0, 2] and out == {"finished_folds": [0, 2], "num_folds": 4}
  assert not os.path.exists(os.path.join(workdir, "protocol_results.json"))
  rec = _read(os.path.join(workdir, "fold_2", "fold.json"))
  assert rec["train_class_ids"] == [0, 2, 3, 4] and rec["val_class_ids"] == [1]
  assert rec["test_class_ids"] == [5, 6, 7, 8, 9] and rec["finished"] is True
  assert rec["config"]["dataset"]["options"]["protocol_fold"] == 2
  z = np.load(os.path.join(workdir, "fold_2", "test_embeddings.npz"))
  assert sorted(z.files) == ["embeddings", "labels", "num_queries"]
  assert z["embeddings"].shape == (896, 8) and sorted(set(z["labels"].tolist())) == [5, 6, 7, 8, 9]

  # A fold that started but did not finish (fold.json says so) is run again; 0 and 2 are not.
  os.makedirs(os.path.join(workdir, "fold_1"))
  with open(os.path.join(workdir, "fold_1", "fold.json"), "w") as f:
    json.dump(dict(rec, fold=1, finished=False), f)
  res = protocol.run_protocol(cfg, workdir)
  assert calls == [0, 2, 1, 3]
  assert sorted(res) == ["class_pool", "concatenated", "concatenated_dim", "dataset",
                         "embedding_dim", "folds", "num_folds", "protocol", "separate"]
  assert res == _read(os.path.join(workdir, "protocol_results.json"))
  assert res["class_pool"] == {"trainval": [0, 1, 2, 3, 4], "test": [5, 6, 7, 8, 9]}
  assert (res["embedding_dim"], res["concatenated_dim"], res["num_folds"]) == (8, 32, 4)
  assert [f["val_class_ids"] for f in res["folds"]] == [[4], [0], [1], [2]]
  assert res["folds"][1]["test"] == {"map_at_r": 0.2, "precision_at_1": 0.5}
  maps = np.array([0.1, 0.2, 0.3, 0.4])
  assert res["separate"]["mean"]["map_at_r"] == pytest.approx(maps.mean())
  assert res["separate"]["std"]["map_at_r"] == pytest.approx(maps.std(ddof=1))
  assert res["separate"]["num_models"] == 4
  # 512-D: the saved embeddings, normalised, concatenated, normalised, with the trainer's metrics.
  saved = [np.load(os.path.join(workdir, f"fold_{k}", "test_embeddings.npz")) for k in range(4)]
  cat = protocol.concatenate_embeddings([s["embeddings"] for s in saved])
  want = metrics_lib.retrieval_metrics(cat, saved[0]["labels"], recall_ks=(1,))
  assert res["concatenated"] == pytest.approx({k: float(v) for k, v in want.items()})

  # Everything finished: a rerun trains nothing; a changed config is refused, naming the key.
  protocol.run_protocol(cfg, workdir)
  assert calls == [0, 2, 1, 3]
  with pytest.raises(errors.ConfigChanged, match=r"fold 0 .*optim.learning_rate: 0.001 -> 0.5"):
    protocol.run_protocol(_config(**{"optim.learning_rate": 0.5}), workdir)
  protocol.run_protocol(_config(progress=True), workdir)      # a resume-safe key may change
  assert calls == [0, 2, 1, 3]
  protocol.run_protocol(_config(**{"optim.learning_rate": 0.5}), workdir, folds=[3],
                        allow_config_change=True)
  assert calls == [0, 2, 1, 3, 3]


def test_different_test_labels_are_an_error(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_train(calls))
  workdir = str(tmp_path / "proto")
  protocol.run_protocol(_config(), workdir, folds=[0, 1, 2])
  path = os.path.join(workdir, "fold_1", "test_embeddings.npz")
  z = dict(np.load(path))
  np.savez(path, embeddings=z["embeddings"], labels=z["labels"][::-1])
  with pytest.raises(ValueError, match="fold_1 differ from fold 0's"):
    protocol.run_protocol(_config(), workdir, folds=[3])


# ============================================================================= real runs




def _cli(workdir, *extra):
  return (["dmljax.protocol", f"--config={CONFIG}", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """All four folds in one command (the CLI, in-process)."""
  del cache_dir
  workdir = str(tmp_path_factory.mktemp("ref"))
  assert protocol.main(_cli(workdir)) == 0
  return workdir, _read(os.path.join(workdir, "protocol_results.json"))


def _metric_part(res):
  return {"separate": res["separate"], "concatenated": res["concatenated"],
          "folds": [{k: f[k] for k in ("train_class_ids", "val_class_ids", "test", "val",
                                       "best_step")} for f in res["folds"]]}


def test_end_to_end(reference):
  workdir, res = reference
  for k in range(4):
    d = os.path.join(workdir, f"fold_{k}")
    for name in ("fold.json", "final_metrics.json", "test_embeddings.npz", "config.json"):
      assert os.path.isfile(os.path.join(d, name)), (k, name)
    final = _read(os.path.join(d, "final_metrics.json"))
    fold = res["folds"][k]
    assert fold["test"]["map_at_r"] == final["test/map_at_r"] and final["step"] == 8
    assert fold["val_class_ids"] == splits.protocol_folds(range(5))[k]["val"]
    # The saved embeddings are the best parameters' test embeddings: same metrics as the fold's.
    z = np.load(os.path.join(d, "test_embeddings.npz"))
    assert z["embeddings"].shape == (896, 16)
    again = metrics_lib.retrieval_metrics(z["embeddings"], z["labels"], recall_ks=(1,))
    for m in ("map_at_r", "r_precision", "precision_at_1"):
      assert again[m] == pytest.approx(final[f"test/{m}"], rel=1e-6), (k, m)
  assert (res["embedding_dim"], res["concatenated_dim"]) == (16, 64)
  for m in ("map_at_r", "r_precision", "precision_at_1"):
    vals = np.array([f["test"][m] for f in res["folds"]])
    assert res["separate"]["mean"][m] == pytest.approx(vals.mean())
    assert res["separate"]["std"][m] == pytest.approx(vals.std(ddof=1))
    assert 0.0 <= res["concatenated"][m] <= 1.0


def test_resume_runs_only_the_missing_folds(reference, tmp_path, monkeypatch, capsys):
  _, ref = reference
  workdir = str(tmp_path / "proto")
  out = protocol.run_protocol(_config(), workdir, folds=[0, 1])
  assert out["finished_folds"] == [0, 1]
  mtimes = {k: os.path.getmtime(os.path.join(workdir, f"fold_{k}", "final_metrics.json"))
            for k in (0, 1)}
  seen, real = [], train.train_and_evaluate

  def spy(config, workdir_, **kw):
    seen.append(os.path.basename(workdir_))
    return real(config, workdir_, **kw)

  monkeypatch.setattr(train, "train_and_evaluate", spy)
  capsys.readouterr()
  res = protocol.run_protocol(_config(), workdir)
  assert seen == ["fold_2", "fold_3"]
  assert "fold 0: finished, skipped" in capsys.readouterr().out
  for k in (0, 1):
    assert os.path.getmtime(os.path.join(workdir, f"fold_{k}", "final_metrics.json")) == mtimes[k]
  assert _metric_part(res) == _metric_part(ref)               # as if run in one go


def test_fold_interrupted_mid_run_resumes_from_its_checkpoint(reference, tmp_path, capsys):
  _, ref = reference
  workdir = str(tmp_path / "proto")
  # Checkpoints every 2 steps (a resume-safe key): a SIGTERM once step 2 is saved stops fold 0.
  cfg = _config(**{"checkpoint.every_steps": 2})
  ckpt = os.path.join(workdir, "fold_0", "checkpoints", "2")

  def send_when_checkpointed():
    deadline = time.time() + 120
    while not os.path.isdir(ckpt) and time.time() < deadline:
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, lambda *a: None)   # a late signal must not kill pytest
  try:
    threading.Thread(target=send_when_checkpointed, daemon=True).start()
    out = protocol.run_protocol(cfg, workdir, folds=[0])
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert out["preempted"] and out["fold"] == 0 and 2 <= out["step"] < 8, out
  assert _read(os.path.join(workdir, "fold_0", "fold.json"))["finished"] is False
  assert not os.path.exists(os.path.join(workdir, "fold_0", "test_embeddings.npz"))
  capsys.readouterr()
  protocol.run_protocol(cfg, workdir, folds=[0])
  assert f"Resumed from step {out['step']}" in capsys.readouterr().out
  final = _read(os.path.join(workdir, "fold_0", "final_metrics.json"))
  assert {k[5:]: v for k, v in final.items() if k.startswith("test/")} == ref["folds"][0]["test"]


def test_cli_errors(reference, tmp_path, capsys):
  workdir, _ = reference
  cases = [
      (["dmljax.protocol", f"--config={CONFIG}"], "--workdir is required"),
      (_cli(str(tmp_path / "x"), "--config.batchsize=8"),
       "unknown config key 'batchsize' in --config.batchsize=8; did you mean 'batch_size'"),
      (_cli(str(tmp_path / "x"), "--folds=0,7"), r"Bad --folds \[0, 7\]"),
      (_cli(str(tmp_path / "x"), "--folds=a"), "expected comma-separated fold numbers"),
      (_cli(workdir, "--config.optim.learning_rate=0.5"),
       "fold 0 in .* was trained with another config: optim.learning_rate: 0.001 -> 0.5"),
  ]
  import re  # pylint: disable=g-import-not-at-top
  for argv, match in cases:
    assert protocol.main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("python -m dmljax.protocol: error: "), err
    assert re.search(match, err[0]), (match, err)
    assert "--verbose" in err[1] and len(err) == 2
  assert not os.path.exists(tmp_path / "x")                   # nothing started


# ============================================================================= report


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f)


@pytest.fixture
def fake_runs(tmp_path):
  fold_vals = {"precision_at_1": [0.70, 0.72, 0.74, 0.76], "r_precision": [0.40, 0.40, 0.40, 0.40],
               "map_at_r": [0.30, 0.31, 0.32, 0.33], "recall_at_1": [0.70, 0.72, 0.74, 0.76],
               "recall_at_2": [0.80, 0.80, 0.81, 0.81], "nmi": [0.60, 0.62, 0.61, 0.61],
               "f1": [0.25, 0.25, 0.25, 0.25]}
  folds = [{"fold": k, "test": {m: v[k] for m, v in fold_vals.items()}} for k in range(4)]
  cat = {"precision_at_1": 0.801, "r_precision": 0.456, "map_at_r": 0.3449, "recall_at_1": 0.801,
         "recall_at_2": 0.9, "nmi": 0.65, "f1": 0.3}
  _write(str(tmp_path / "proto" / "protocol_results.json"),
         {"folds": folds, "concatenated": cat, "embedding_dim": 128, "concatenated_dim": 512,
          "separate": {}})
  for seed, p1 in ((0, 0.5), (1, 0.6)):
    d = tmp_path / f"seed{seed}"
    _write(str(d / "final_metrics.json"),
           {"test/precision_at_1": p1, "test/r_precision": 0.3, "test/map_at_r": 0.2,
            "test/recall_at_1": p1, "test/recall_at_4": 0.9, "test/ndcg_at_4": 0.75,
            "val/map_at_r": 0.9, "untrained/test/map_at_r": 0.01, "step": 10})
    _write(str(d / "config.json"), {"model": {"embedding_dim": 128}})
  return tmp_path


EXPECTED = """\
### P@1, P@R, MAP@R (test, %; as CCP Table II)

| run | 512D P@1 | 512D P@R | 512D MAP@R | 128D P@1 | 128D P@R | 128D MAP@R |
|:--|--:|--:|--:|--:|--:|--:|
| ccp | 80.1 | 45.6 | 34.5 | 73.0 ± 2.6 | 40.0 ± 0.0 | 31.5 ± 1.3 |
| base | - | - | - | 55.0 ± 7.1 | 30.0 ± 0.0 | 20.0 ± 0.0 |

### NMI, F1, R@k (test, %; as PROFS Table 1)

| run | NMI | F1 | R@1 | R@2 | R@4 |
|:--|--:|--:|--:|--:|--:|
| ccp (128D) | 61.0 ± 0.8 | 25.0 ± 0.0 | 73.0 ± 2.6 | 80.5 ± 0.6 | - |
| ccp (512D) | 65.0 | 30.0 | 80.1 | 90.0 | - |
| base | - | - | 55.0 ± 7.1 | - | 90.0 ± 0.0 |

### R@k, nDCG@k (test, %; as the DRO and MPA tables)

| run | R@1 | R@2 | R@4 | nDCG@4 |
|:--|--:|--:|--:|--:|
| ccp (128D) | 73.0 ± 2.6 | 80.5 ± 0.6 | - | - |
| ccp (512D) | 80.1 | 90.0 | - | - |
| base | 55.0 ± 7.1 | - | 90.0 ± 0.0 | 75.0 ± 0.0 |

a ± b: mean ± sample standard deviation over the row's fold models or runs; -: not measured."""


def test_report_tables(fake_runs, capsys):
  dirs = [str(fake_runs / n) for n in ("proto", "seed0", "seed1")]
  assert report.run(dirs + ["--names", "ccp,base,base"]) == 0
  assert capsys.readouterr().out == EXPECTED + "\n"
  # One plain run alone: only the retrieval table's single-model columns (no clustering, R@1 only).
  d = fake_runs / "plain"
  _write(str(d / "final_metrics.json"), {"test/precision_at_1": 0.5, "test/r_precision": 0.25,
                                         "test/map_at_r": 0.125, "test/recall_at_1": 0.5})
  assert report.main([str(d)]) == (
      "### P@1, P@R, MAP@R (test, %; as CCP Table II)\n\n"
      "| run | single P@1 | single P@R | single MAP@R |\n|:--|--:|--:|--:|\n"
      f"| {os.path.normpath(str(d))} | 50.0 | 25.0 | 12.5 |\n\n"
      "a ± b: mean ± sample standard deviation over the row's fold models or runs; "
      "-: not measured.")


def test_report_errors(fake_runs, capsys):
  os.makedirs(fake_runs / "unfinished" / "fold_0")
  cases = [([str(fake_runs / "nope")], "no such directory"),
           ([str(fake_runs / "unfinished")], "protocol directory without protocol_results.json"),
           ([str(fake_runs / "seed0"), "--names", "a,b"], "--names gives 2 names for 1 DIRs")]
  for argv, match in cases:
    assert report.run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m dmljax.report: error: ") and match in err, err
