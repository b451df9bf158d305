"""Runs a person can follow and trust (issue 21): configs checked before anything compiles, errors
as one line, the workdir lock, finished runs rerun / extended / refused, the protocol's classes,
the console lines."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import digits_ccp
from dmljax import cli, config_check, config_reference, console, extend, lock, train
from dmljax.configs import set_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ============================================================================= configs and errors

_FILES = {
    "syntax.py": "def get_config(:\n  pass\n",
    "noget.py": "X = 1\n",
    "dict.py": "def get_config():\n  return {'a': 1}\n",
    "typo.py": ("from dmljax.configs import base_config\n"
                "def get_config(arg=''):\n  c = base_config()\n  c.framwork = 'ccp'\n  return c\n"),
    "freeform.py": ("from dmljax.configs import base_config\n"
                    "def get_config(arg=''):\n  c = base_config()\n"
                    "  c.dataset.options.val_fraction = 0.3\n  return c\n"),
}


@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cfgs")
  for name, text in _FILES.items():
    (d / name).write_text(text)
  return str(d)


DIGITS = os.path.join(ROOT, "configs", "digits_ccp.py")


@pytest.mark.parametrize("argv,match", [
    (["--config={d}/syntax.py"], r"syntax\.py has a syntax error at line 1: .*; fix the file"),
    (["--config={d}/noget.py"], r"defines no get_config\(\); a config file defines get_config"),
    (["--config={d}/dict.py"], r"returned a dict, not an ml_collections\.ConfigDict"),
    (["--config={d}/missing.py"], r"config file .*missing\.py not found"),
    (["--config={d}/typo.py"], r"unknown config key 'framwork' in .*; did you mean 'framework'"),
    ([f"--config={DIGITS}:nope"], r"get_config\('nope'\) of .*: Unknown variant 'nope'"),
    ([f"--config={DIGITS}", "--config.train.batch_size=abc"],
     r"unknown config key 'train\.batch_size' in --config\.train\.batch_size=abc; did you mean "
     r"'batch_size'"),
])
def test_config_file_and_override_errors(cfg_dir, argv, match):
  argv = [a.format(d=cfg_dir) for a in argv]
  with pytest.raises(config_check.ConfigError, match=match):
    config_check.precheck(["prog"] + argv)


def test_free_form_blocks_take_new_keys(cfg_dir):
  c = config_check.precheck(["prog", f"--config={cfg_dir}/freeform.py"])
  assert c.dataset.options.val_fraction == 0.3


@pytest.mark.parametrize("changes,match", [
    ({"model.embedding_dim": 0}, r"config\.model\.embedding_dim must be an integer >= 1, got 0"),
    ({"eval_batch_size": 0}, r"config\.eval_batch_size must be an integer >= 1, got 0"),
    ({"loss.name": "multi_similarity"},
     r"loss\.kwargs has \['neg_margin', 'pos_margin'\] but loss 'multi_similarity' takes "
     r"\['alpha', 'beta', 'base', 'reduction'\]"),
    ({"ccp.in_batch_loss": "contrastive", "ccp.in_batch_kwargs.margin": 0.5},
     r"ccp\.in_batch_kwargs has \['margin'\]"),
    ({"model.pretrained": "/nonexistent/bn_inception.pth"},
     r"weight file /nonexistent/bn_inception\.pth \(config\.model\.pretrained\) not found"),
    ({"dataset.name": "cub", "dataset.data_dir": "{tmp}"}, r"Data set 'cub' is not prepared in"),
    ({"batch_size": 30}, r"batch_size=30 is not a multiple of config\.sampler\.m=8"),
])
def test_values_checked_up_front(changes, match, tmp_path):
  c = digits_ccp.get_config("small")
  with c.unlocked():
    set_keys(c, {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
                 for k, v in changes.items()})
  # DatasetNotPrepared is a FileNotFoundError: also one message, exit status 2.
  with pytest.raises(config_check.ConfigError if "Data set" not in match else OSError,
                     match=match):
    config_check.check(c)


def test_every_shipped_config_passes_the_key_check():
  import glob  # pylint: disable=g-import-not-at-top
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    if path.endswith("paper.py"):  # one config per catalogue row: each row's, and :small
      from dmljax import paper  # pylint: disable=g-import-not-at-top
      for row in paper.rows():
        for variant in ("", ":small"):
          config_check.check_keys(config_check.load_file(f"{path}:{row.id}{variant}"))
    elif not path.endswith("__init__.py"):
      config_check.check_keys(config_check.load_file(path))


def _cli(args, cwd, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("DMLJAX_VERBOSE", None)
  return subprocess.run([sys.executable, "-m", "dmljax.main"] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300, **kw)


def test_cli_check_print_config_and_one_line_errors(cfg_dir, tmp_path):
  # --print_config and --check: no --workdir, nothing created (no runs/NAME), exit 0.
  r = _cli([f"--config={DIGITS}:small", "--print_config", "--config.total_steps=7"], tmp_path)
  assert r.returncode == 0, r.stderr
  lines = dict(line.split(None, 1) for line in r.stdout.splitlines())
  assert lines["total_steps"] == "7" and lines["framework"] == "'ccp'" and len(lines) > 90
  # Errors: exactly one message line plus the --verbose hint, nothing before it, exit 2.
  r = _cli([f"--config={cfg_dir}/syntax.py", "--check"], tmp_path)
  assert r.returncode == 2
  assert r.stderr.splitlines() == [
      f"python -m dmljax.main: error: config file {cfg_dir}/syntax.py has a syntax error at "
      "line 1: invalid syntax; fix the file",
      "python -m dmljax.main: (run with --verbose or DMLJAX_VERBOSE=1 for the traceback)"]
  assert os.listdir(tmp_path) == []


def test_evaluate_empty_file_is_one_message(tmp_path):
  from dmljax import evaluate  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty.npz"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty\.npz is not a readable \.npz file"):
    evaluate.load(str(empty))


def test_config_reference_is_current():
  assert config_reference.undocumented() == []
  with open(os.path.join(ROOT, "docs", "config.md")) as f:
    assert f.read() == config_reference.render(), (
        "docs/config.md is stale: python -m dmljax.config_reference > docs/config.md")


# ============================================================================= lock


def test_lock_refuses_a_second_run_and_takes_over_stale_ones(tmp_path, monkeypatch):
  w = str(tmp_path)
  first = lock.WorkdirLock(w, heartbeat_s=0).acquire()
  with pytest.raises(lock.WorkdirLocked, match=rf"locked .*host {socket.gethostname()}, pid "
                     rf"{os.getpid()}"):
    lock.WorkdirLock(w, heartbeat_s=0).acquire()
  first.release()
  assert not os.path.exists(os.path.join(w, lock.LOCK_FILE))
  # A holder on another host whose heartbeat is stale is taken over; a fresh one is not.
  path = os.path.join(w, lock.LOCK_FILE)
  rec = {"host": "elsewhere", "pid": 1, "run_id": "x", "started": 0, "heartbeat": time.time()}
  with open(path, "w") as f:
    json.dump(rec, f)
  with pytest.raises(lock.WorkdirLocked, match="host elsewhere, pid 1"):
    lock.WorkdirLock(w, heartbeat_s=0, stale_s=60).acquire()
  with open(path, "w") as f:
    json.dump(dict(rec, heartbeat=time.time() - 120), f)
  taken = lock.WorkdirLock(w, heartbeat_s=0, stale_s=60).acquire()
  assert json.load(open(path))["run_id"] == taken.run_id
  taken.release()
  # A holder on this host whose process has ended is taken over at once.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(path, "w") as f:
    json.dump(dict(rec, host=socket.gethostname(), pid=dead.pid), f)
  lock.WorkdirLock(w, heartbeat_s=0).acquire().release()
  # The bucket path (etils.epath, as for gs://), exercised on a local folder.
  monkeypatch.setattr(lock, "_remote", lambda p: True)
  with lock.WorkdirLock(w, heartbeat_s=0):
    with pytest.raises(lock.WorkdirLocked, match="locked"):
      lock.WorkdirLock(w, heartbeat_s=0).acquire()


def test_lock_heartbeat_moves(tmp_path):
  with lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05) as held:
    path = os.path.join(str(tmp_path), lock.LOCK_FILE)
    first = json.load(open(path))["heartbeat"]
    time.sleep(0.3)
    assert json.load(open(path))["heartbeat"] > first and held.lost is None


# ============================================================================= finishing, extending


def _config(**extra):
  c = digits_ccp.get_config("small")
  base = {"total_steps": 4, "eval_every_steps": 2, "checkpoint.every_steps": 2,
          "log_every_steps": 2,
          "progress": False, "num_devices": 1, "baselines": ()}
  set_keys(c, {**base, **extra})
  return c


def test_finished_run_rerun_extended_and_refused(tmp_path, monkeypatch, capsys, cache_dir):
  del cache_dir
  w = str(tmp_path / "run")
  first = train.train_and_evaluate(_config(), w)
  assert first["step"] == 4
  assert not os.path.exists(os.path.join(w, lock.LOCK_FILE))      # released at the end
  capsys.readouterr()
  real = train._train_and_evaluate  # pylint: disable=protected-access
  monkeypatch.setattr(train, "_train_and_evaluate",
                      lambda *a, **k: pytest.fail("a finished run was run again"))
  again = train.train_and_evaluate(_config(), w)
  assert again["test/map_at_r"] == first["test/map_at_r"]
  assert "Already finished" in capsys.readouterr().out
  monkeypatch.setattr(train, "_train_and_evaluate", real)
  saved = open(os.path.join(w, "config.json")).read()
  # A change that trains nothing, and a key read only at the start: refused, nothing written.
  with pytest.raises(cli.ConfigChanged, match=r"finished at step 4 .*total_steps=4 is not "
                     r"above it"):
    train.train_and_evaluate(_config(**{"optim.learning_rate": 1e-4}), w,
                             allow_config_change=True)
  assert open(os.path.join(w, "config.json")).read() == saved
  # Extending: steps 5-6 train, the final metrics say step 6.
  out = train.train_and_evaluate(_config(total_steps=6), w, allow_config_change=True)
  assert out["step"] == 6
  assert json.load(open(os.path.join(w, "final_metrics.json")))["step"] == 6
  records = [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6]
  assert [r["step"] for r in records if r["kind"] == "final"] == [6]


def test_extension_by_patience_and_start_only_keys():
  c = _config(total_steps=100, patience_evals=2)
  host, tracker = {"step": 40, "done": True}, {"evals_since_best": 2}
  with pytest.raises(cli.ConfigChanged, match=r"seed: 0 -> 1.*read only when a run starts"):
    extend.check_changes(c, {"step": 10, "done": False}, {"evals_since_best": 0},
                         {"seed": (0, 1), "total_steps": (40, 100)}, "W")
  with pytest.raises(cli.ConfigChanged, match=r"patience_evals above 2"):
    extend.check_changes(c, host, tracker, {"total_steps": (40, 100)}, "W")
  c.patience_evals = 5
  extend.check_changes(c, host, tracker, {"patience_evals": (2, 5)}, "W")
  assert extend.reopen(c, host, tracker, "/nonexistent")["done"] is False


# ============================================================================= protocol classes


def test_protocol_folds_are_the_prepared_train_classes(tmp_path, monkeypatch):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tinydata  # pylint: disable=g-import-not-at-top
  from configs import sop_ccp  # pylint: disable=g-import-not-at-top
  from dmljax import protocol  # pylint: disable=g-import-not-at-top
  data_dir = tinydata.prepare_tiny("sop", tmp_path, train_classes=9, test_classes=6)
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)  # only dataset.data_dir says where it is
  c = sop_ccp.get_config("small")
  c.dataset.data_dir = data_dir
  classes = protocol.class_folds(c)
  assert classes["trainval"] == list(range(1, 10))        # all 9 prepared train classes
  assert classes["test"] == list(range(10, 16))
  ds = train.create_input(protocol.fold_config(c, 1))
  trained = sorted(int(x) for x in ds.train.class_ids)
  assert trained == classes["folds"][1]["train"]


# ============================================================================= console


def test_console_plain_lines(capsys):
  con = console.Console(total_steps=100, start_step=0, enabled=True)
  con.t_start -= 10.0  # 10 s for the first 50 steps: 10 s left
  con.train(50, 5.0, 0.25, "projection 1")
  con.evaluation(50, {"map_at_r": 0.5, "precision_at_1": 0.75, "r_precision": 0.6}, 0.55, 40,
                 {"ccp/projection": 1, "ccp/reset": 0})
  con.early_stop(60, 3, 3, 0.55, 40)
  console.results("/tmp/w", plots=False)
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "step 50/100 | 5.0 steps/s | loss 0.2500 | projection 1 | ETA 0:00:10"
  assert out[1] == ("eval step 50/100 | val MAP@R 0.5000 R-prec 0.6000 P@1 0.7500 | best "
                    "0.5500 (step 40) | ccp/projection 1")
  assert out[2].startswith("Early stop at step 60 of 100") and "patience_evals=3" in out[2]
  assert "/tmp/w/final_metrics.json" in out[3] and "tensorboard --logdir /tmp/w/tensorboard" \
      in out[3]


# ============================================================================= full or read-only disks


def test_failed_checkpoint_save_leaves_no_temporary_folder(tmp_path):
  import errno  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dmljax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_best=False)
  ckpt.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1})

  def full_disk(step, **kw):
    del kw
    os.makedirs(os.path.join(ckpt.directory, f"{step}.orbax-checkpoint-tmp-99", "state"))
    raise OSError(errno.ENOSPC, "No space left on device")

  ckpt.manager.save = full_disk
  with pytest.raises(OSError, match=r"cannot write checkpoint step 2 .*No space left on device.*"
                     r"disk full or read-only.*resume from step 1 \(its temporary folder was "
                     r"removed\)"):
    ckpt.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})
  assert sorted(os.listdir(ckpt.directory)) == ["1"]
  ckpt.close()


def test_failed_async_checkpoint_save_is_reported_and_cleaned(tmp_path):
  """A background save that fails comes out at the next wait as the same one-line OSError,
  naming the step in flight, and its temporary folder is removed."""
  import errno  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dmljax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_best=False, async_save=True)
  ckpt.save(1, {"w": np.zeros(3, np.float32)}, {"step": 1}, wait=True)
  real_wait = ckpt.manager.wait_until_finished

  def in_flight(step, **kw):  # the synchronous part succeeds; the write goes on "in background"
    del kw
    os.makedirs(os.path.join(ckpt.directory, f"{step}.orbax-checkpoint-tmp-7", "state"))

  def background_failed():
    ckpt.manager.wait_until_finished = real_wait
    raise OSError(errno.ENOSPC, "No space left on device")

  ckpt.manager.save = in_flight
  ckpt.manager.wait_until_finished = background_failed
  ckpt.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})  # returns: the write is in flight
  with pytest.raises(OSError, match=r"cannot write checkpoint step 2 .*No space left on device.*"
                     r"resume from step 1 \(its temporary folder was removed\)"):
    ckpt.wait_until_finished()
  assert sorted(os.listdir(ckpt.directory)) == ["1"]
  ckpt.close()


def test_read_only_workdir_is_one_message(tmp_path, monkeypatch):
  def read_only(*a, **k):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(lock.os, "open", read_only)  # root ignores chmod: simulate it
  with pytest.raises(OSError, match=r"cannot write in workdir .* \(Permission denied\); give a "
                     "writable --workdir"):
    lock.WorkdirLock(str(tmp_path), heartbeat_s=0).acquire()
  assert os.listdir(tmp_path) == []


# The README's and the documentation's snippets run in tests/test_docs.py.
