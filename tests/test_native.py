"""The compiled kNN kernel: what gets loaded is verified, bad entries are rebuilt, NaN-safe."""
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from dmljax.kernels import knn as knn_lib
from dmljax.kernels import native


@pytest.fixture(scope="module")
def fake_cxx(tmp_path_factory):
  """A stand-in compiler that copies a really built library to its ``-o`` argument and logs
  each call, so that rebuilds take no time and can be counted."""
  good = native.build_library()  # the real build (usually cached already)
  d = tmp_path_factory.mktemp("cxx")
  log = d / "calls.log"
  script = d / "fakecxx"
  script.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      echo call >> '{log}'
      [ -n "$FAKECXX_SLEEP" ] && sleep "$FAKECXX_SLEEP"
      while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
      cp '{good}' "$out"
      """))
  script.chmod(0o755)

  class Fake:
    path = str(script)

    @staticmethod
    def calls() -> int:
      return len(log.read_text().splitlines()) if log.exists() else 0

  return Fake


def _entry(directory, cxx):
  """The path of a verified cache entry that ``cxx`` built in ``directory``."""
  directory.mkdir(mode=0o700, exist_ok=True)
  path = native.build_library(directory, cxx=cxx.path)
  assert path.is_file()
  return path


_CHILD = textwrap.dedent("""\
    import json, warnings
    import numpy as np
    from dmljax.kernels import knn, native
    x = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    with warnings.catch_warnings(record=True) as w:
      warnings.simplefilter("always")
      ok = native.available()
      same = ok and bool((knn.knn(x, k=4, use_native=True).indices ==
                          knn.knn(x, k=4, use_native=False).indices).all())
    maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "knn_select" in l})
    print(json.dumps(dict(ok=ok, same=same, maps=maps, warnings=[str(m.message) for m in w])))
    """)


def _child(cache, cxx, **env):
  """Runs a fresh process that uses the kernel from ``cache``; returns its report."""
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "DMLJAX_CACHE_DIR": str(cache), "CXX": cxx.path, **env}
  proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_library_is_rebuilt_in_a_fresh_process(tmp_path, fake_cxx, damage):
  # Guards: a truncated library used to be dlopen'ed (SIGBUS), a garbage one disabled the kernel.
  lib = _entry(tmp_path / "cache", fake_cxx)
  data = lib.read_bytes()
  lib.write_bytes(data[:len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
  before = fake_cxx.calls()
  out = _child(tmp_path / "cache", fake_cxx)
  assert out["ok"] and out["same"], out
  assert fake_cxx.calls() == before + 1 and out["maps"] == [str(lib)]
  assert native.verify_library(lib) is None
  lib.write_bytes(data[:100])
  assert "SHA-256" in native.verify_library(lib)


def test_wrong_digest_missing_digest_and_writable_library_are_rebuilt(tmp_path, fake_cxx):
  # Guards: the library used to be trusted by its name alone (no digest, no permission check).
  lib = _entry(tmp_path / "cache", fake_cxx)
  side = lib.with_name(lib.name + ".sha256")
  side.write_text("0" * 64 + "\n")
  before = fake_cxx.calls()
  assert native.build_library(tmp_path / "cache", cxx=fake_cxx.path) == lib
  assert fake_cxx.calls() == before + 1 and native.verify_library(lib) is None
  side.write_text("0" * 64 + "\n")
  assert "SHA-256" in native.verify_library(lib)
  native.build_library(tmp_path / "cache", cxx=fake_cxx.path)
  before += 1
  side.unlink()
  assert "no digest" in native.verify_library(lib)
  native.build_library(tmp_path / "cache", cxx=fake_cxx.path)
  assert fake_cxx.calls() == before + 2 and native.verify_library(lib) is None
  lib.chmod(0o775)  # group-writable: anyone in the group could change the code
  assert "writable by other users" in native.verify_library(lib)
  native.build_library(tmp_path / "cache", cxx=fake_cxx.path)
  assert fake_cxx.calls() == before + 3 and native.verify_library(lib) is None
  assert not lib.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
  if os.getuid() == 0:  # someone else's file (only root can make one here)
    os.chown(lib, 65534, 65534)
    assert "belongs to uid 65534" in native.verify_library(lib)
    native.build_library(tmp_path / "cache", cxx=fake_cxx.path)
    assert fake_cxx.calls() == before + 4 and lib.stat().st_uid == 0
  # A verified entry is reused as it is.
  mtime = lib.stat().st_mtime_ns
  native.build_library(tmp_path / "cache", cxx=fake_cxx.path)
  assert lib.stat().st_mtime_ns == mtime and fake_cxx.calls() == before + 3 + (os.getuid() == 0)


def test_untrusted_cache_directory_is_not_loaded_from(tmp_path, fake_cxx, monkeypatch):
  # Guards: a cache directory anyone can write to used to be loaded from (code injection).
  shared = tmp_path / "shared"
  lib = _entry(shared, fake_cxx)
  shared.chmod(0o777)
  monkeypatch.setenv("DMLJAX_CACHE_DIR", str(shared))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  with pytest.warns(RuntimeWarning, match=r"not using the kernel cache .*writable by other users"):
    path = native.build_library(cxx=fake_cxx.path)
  assert path == tmp_path / "xdg" / "dmljax" / lib.name and native.verify_library(path) is None
  assert "without the sticky bit" in native.verify_library(lib)
  # In a process: the kernel works, loaded from the per-user directory, with the warning.
  out = _child(shared, fake_cxx, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert out["ok"] and out["same"] and out["maps"] == [str(path)], out
  assert any("writable by other users" in w for w in out["warnings"]), out
  # An explicit directory that cannot be trusted: a clear error, nothing built there.
  with pytest.raises(native.NativeBuildError, match="no trustworthy directory"):
    native.build_library(shared, cxx=fake_cxx.path)
  # The sticky bit (as on /tmp) makes a shared directory fine for one's own files.
  shared.chmod(0o1777)
  assert native.verify_library(lib) is None


def test_stale_temporary_files_are_removed_and_concurrent_builds_compile_once(tmp_path, fake_cxx,
                                                                             monkeypatch):
  # Guards: temporary files of a killed build stayed forever; concurrent builders each compiled.
  cache = tmp_path / "cache"
  lib = _entry(cache, fake_cxx)
  stale, fresh = cache / ".knn_select-killed.so", cache / ".knn_select-running.so"
  stale.write_bytes(b"half a library")
  fresh.write_bytes(b"being written")
  old = time.time() - 7200  # two hours: older than any running build (STALE_SECONDS)
  os.utime(stale, (old, old))
  lib.unlink()
  native.build_library(cache, cxx=fake_cxx.path)
  assert not stale.exists() and fresh.exists()  # a recent one may belong to a running build
  lib.unlink()
  monkeypatch.setenv("FAKECXX_SLEEP", "1")
  before = fake_cxx.calls()
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(
      native.build_library(cache, cxx=fake_cxx.path))) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert paths == [lib] * 3 and fake_cxx.calls() == before + 1
  assert native.verify_library(lib) is None


# ----------------------------------------------------------------------------- NaN safety


def _raw_topk(refs, use_native, k, group=2, ref_block=8, query_block=4):
  """The blocked search on raw, unchecked references (same-set mode, one device): what the
  selection does if non-finite scores ever reach it."""
  n = refs.shape[0]
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("q",))
  with np.errstate(all="ignore"):
    ra = knn_lib._augment_refs(refs, ref_block, min_rows=(k + 1) * group)
  qa = knn_lib._augment_queries(refs, n + (-n) % query_block)
  qa = qa.reshape(-1, query_block, refs.shape[1] + 1)
  qidx = np.arange(qa.shape[0] * query_block, dtype=np.int32).reshape(-1, query_block)
  if use_native:
    assert native.available()
  fn = knn_lib._topk_fn(mesh, k, ref_block, group, True, use_native)
  _, idx = fn(qa, qidx, ra)
  return np.asarray(idx).reshape(-1, k)[:n]


@pytest.mark.parametrize("pattern", ["all_nan", "some_nan", "overflow"])
def test_selection_with_nan_scores_never_returns_self_or_padding(pattern):
  # Guards: NaN scores made the C++ selection read past its buffer and return self/bad indices.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((11, 3)).astype(np.float32)
  if pattern == "all_nan":
    x[:] = np.nan
  elif pattern == "some_nan":
    x[[1, 4, 5, 9], 1] = np.nan
  else:  # finite, but |x|^2 overflows float32: scores are inf - inf = NaN or -inf
    x *= np.float32(3e19)
  for use_native in (True, False):
    for k in (1, 5, 10):
      idx = _raw_topk(x, use_native, k)
      where = dict(use_native=use_native, k=k, indices=idx)
      assert ((idx >= 0) & (idx < len(x))).all(), where
      assert (idx != np.arange(len(x))[:, None]).all(), where
      assert all(len(set(row)) == k for row in idx.tolist()), where


def test_threads_of_the_selection_do_not_change_results(monkeypatch):
  # Feature check (rows spread over XLA's pool): any thread count gives the same answer.
  x = np.random.default_rng(3).integers(-3, 4, (300, 6)).astype(np.float32)  # many exact ties
  one = Mesh(np.asarray(jax.devices()[:1]), ("q",))
  results = []
  for threads in ("1", "3", "16"):
    monkeypatch.setenv("DMLJAX_NATIVE_THREADS", threads)
    results.append(knn_lib.knn(x, k=9, mesh=one, use_native=True, query_block=64, ref_block=64,
                               group=4))
  ref = knn_lib.knn(x, k=9, mesh=one, use_native=False, query_block=64, ref_block=64, group=4)
  for r in results:
    np.testing.assert_array_equal(r.indices, ref.indices)
    np.testing.assert_array_equal(r.distances, results[0].distances)
  monkeypatch.setenv("DMLJAX_NATIVE_THREADS", "many")
  with pytest.raises(ValueError, match="DMLJAX_NATIVE_THREADS"):
    knn_lib.knn(x, k=2, mesh=one, use_native=True)
