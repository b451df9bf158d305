"""Compiled CPU kernels, built on first use with the machine's C++ compiler.

On a CPU host, XLA's ``top_k`` and gathers cost a few nanoseconds per element, which made the
selection step of the blocked kNN (:mod:`dmljax.kernels.knn`) almost half as expensive as its
matrix product. ``knn_select.cc`` does that step as an XLA FFI custom call (same order, same
tie-breaking), its query rows spread over XLA's intra-op thread pool; the matrix product stays in
XLA. A second call there writes each reference block's group maxima into the block's buffer in
place, also over the pool (XLA's own in-place update runs on one thread). In same-set mode two
more calls carry the kNN's symmetric scan: one turns a block pair's dot products into scores for
both blocks' queries and updates their running lists of best references in place, the other
sorts those lists into the result (see knn.py). Nothing here is needed
on GPU or TPU, and nothing changes a result beyond the last-bit rounding of re-scored dot
products.

The library is compiled once per source version, compiler flags and CPU, into
``$DMLJAX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dmljax`` or ``~/.cache/dmljax``). The compiler
is ``$CXX`` or ``c++``; the XLA FFI headers come with jaxlib (``jax.ffi.include_dir()``). If
anything fails, the kNN warns once and uses the pure XLA path. ``DMLJAX_NATIVE=0`` turns the
compiled path off; ``DMLJAX_NATIVE_THREADS=n`` sets the threads of one call (default: the cores
per device of the kNN's mesh, at most XLA's pool).

What is loaded is checked first, since loading a library runs its code in this process:

* the cache directory must belong to you (or root) and be writable by nobody else, unless it has
  the sticky bit (then others cannot replace or delete your files in it);
* the library and its sidecar ``<library>.sha256`` must be regular files that belong to you (or
  root) and that nobody else can write;
* the library's SHA-256 must equal the sidecar's, which is written, atomically, only after the
  compiled library was moved into place. A truncated, garbage or half-replaced file fails this.

The library is read, hashed and loaded through one open file descriptor, so the bytes checked are
the bytes loaded. A library that fails a check is rebuilt (replacing it, atomically). If the
cache directory itself is not trustworthy, or a file in it cannot be replaced (someone else's
file in a sticky directory), the build goes to the next place that is: ``~/.cache/dmljax`` (or
``$XDG_CACHE_HOME/dmljax``), then ``<tmp>/dmljax-<uid>``, with a warning naming the reason.

Builds take a lock file in the directory (``.knn_select.lock``), so that concurrent processes
build once; the one holding the lock removes temporary files of builds that were killed (only
those older than :data:`STALE_SECONDS`, in case a builder without the lock is still writing).

    python -m dmljax.kernels.native   # builds (or verifies) now and prints where the library is
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import hmac
import os
import platform
import shlex
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["KNN_SELECT", "PUT_COLUMNS", "SYM_MERGE", "SYM_SELECT", "NativeBuildError", "enabled", "available", "error",
           "build_library", "cache_dir", "verify_library", "loaded_path", "max_threads"]

#: Names of the FFI targets: the kNN selection step, and the in-place column update.
KNN_SELECT = "dmljax_knn_select"
PUT_COLUMNS = "dmljax_put_columns"
#: Same-set symmetry: a block pair's products into both sides' running best groups, and the
#: selection from those lists (dmljax/kernels/knn.py).
SYM_MERGE = "dmljax_sym_merge"
SYM_SELECT = "dmljax_sym_select"
_SOURCE = Path(__file__).with_name("knn_select.cc")
_SYMBOL = "DmljaxKnnSelect"
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
#: Prefix of the temporary files of a build (library and sidecar), beside the cache entry.
_TMP_PREFIX = ".knn_select-"
_LOCK_NAME = ".knn_select.lock"
#: A temporary build file older than this is left over from a killed build (a compile times out
#: after 300 s).
STALE_SECONDS = 600
_COMPILE_TIMEOUT = 300


class NativeBuildError(RuntimeError):
  """The compiled kernels could not be built or loaded; the message says why and what to do."""


class _Untrusted(Exception):
  """A directory (or a file in it) that must not be loaded from or built into."""


_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None, "path": None}


def enabled() -> bool:
  """False when ``DMLJAX_NATIVE=0`` (or ``false``/``off``) is set."""
  return os.environ.get("DMLJAX_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def max_threads() -> int:
  """``$DMLJAX_NATIVE_THREADS`` (threads of one compiled call), 0 if unset (the kNN decides)."""
  value = os.environ.get("DMLJAX_NATIVE_THREADS", "").strip()
  try:
    return max(0, int(value)) if value else 0
  except ValueError:
    raise ValueError(f"DMLJAX_NATIVE_THREADS={value!r} is not an integer; unset it or give a "
                     f"thread count (1 = no threads).") from None


def _default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "dmljax"


def cache_dir() -> Path:
  """Where built libraries go: ``$DMLJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/dmljax``, else
  ``~/.cache/dmljax``."""
  if os.environ.get("DMLJAX_CACHE_DIR"):
    return Path(os.environ["DMLJAX_CACHE_DIR"])
  return _default_cache_dir()


def _uid() -> Optional[int]:
  return os.getuid() if hasattr(os, "getuid") else None


def _owner_problem(st: os.stat_result, what: str) -> Optional[str]:
  uid = _uid()
  if uid is not None and st.st_uid not in (uid, 0):
    return f"{what} belongs to uid {st.st_uid}, not to you (uid {uid}) or root"
  return None


def _dir_problem(directory: Path) -> Optional[str]:
  """Why libraries must not be loaded from ``directory`` (None: it is fine)."""
  try:
    st = os.stat(directory)
  except OSError as e:
    return f"cannot inspect {directory}: {e}"
  if not stat.S_ISDIR(st.st_mode):
    return f"{directory} is not a directory"
  problem = _owner_problem(st, f"the directory {directory}")
  if problem:
    return problem
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
    return (f"the directory {directory} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit (chmod go-w fixes that)")
  return None


def _file_problem(st: os.stat_result, path: Path) -> Optional[str]:
  if not stat.S_ISREG(st.st_mode):
    return f"{path} is not a regular file"
  problem = _owner_problem(st, str(path))
  if problem:
    return problem
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
  return None


def _sidecar(path: Path) -> Path:
  return path.with_name(path.name + ".sha256")


def _open_nofollow(path: Path) -> int:
  return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _read_fd(fd: int) -> bytes:
  with os.fdopen(os.dup(fd), "rb") as f:
    f.seek(0)
    return f.read()


def _open_verified(path: Path) -> tuple[Optional[int], Optional[str]]:
  """An open descriptor of ``path`` if it passes every check (see the module docstring), else
  ``(None, why)``. The caller closes the descriptor."""
  problem = _dir_problem(path.parent)
  if problem:
    return None, problem
  try:
    fd = _open_nofollow(path)
  except FileNotFoundError:
    return None, f"{path} is not built yet"
  except OSError as e:
    return None, f"cannot open {path}: {e}"
  try:
    problem = _file_problem(os.fstat(fd), path)
    if problem is None:
      side = _sidecar(path)
      try:
        sfd = _open_nofollow(side)
      except OSError as e:
        problem = f"no digest for {path} ({side}: {e.strerror or e})"
      else:
        try:
          problem = _file_problem(os.fstat(sfd), side)
          recorded = _read_fd(sfd).decode("ascii", "replace").strip()
        finally:
          os.close(sfd)
        if problem is None:
          actual = hashlib.sha256(_read_fd(fd)).hexdigest()
          if not hmac.compare_digest(actual, recorded):
            problem = (f"{path} does not match its recorded SHA-256 (truncated, corrupted or "
                       f"replaced)")
    if problem is None:
      return fd, None
  except BaseException:
    os.close(fd)
    raise
  os.close(fd)
  return None, problem


def verify_library(path) -> Optional[str]:
  """Why ``path`` must not be loaded (ownership, permissions, SHA-256 against its sidecar), or
  None if it may."""
  fd, problem = _open_verified(Path(path))
  if fd is not None:
    os.close(fd)
  return problem


def _cpu_signature() -> str:
  """The CPU model and feature flags (the library is built with ``-march=native``)."""
  sig = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("model name", "flags", "Features")):
          sig += line
          if line.startswith(("flags", "Features")):
            break
  except OSError:
    pass
  return sig


@contextlib.contextmanager
def _build_lock(directory: Path):
  """Holds ``directory/.knn_select.lock`` (an advisory ``flock``) while building; without
  ``fcntl``, or if the lock file cannot be opened, builds without it. Waits at most two compile
  timeouts for another builder."""
  try:
    import fcntl
  except ImportError:
    yield
    return
  try:
    fd = os.open(directory / _LOCK_NAME,
                 os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o600)
  except OSError:
    yield
    return
  try:
    deadline = time.monotonic() + 2 * _COMPILE_TIMEOUT + 60
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
          break  # build without it; the atomic replace keeps that safe
        time.sleep(0.1)
    yield
  finally:
    os.close(fd)  # releases the lock


def _remove_stale_temps(directory: Path, max_age: float = STALE_SECONDS) -> None:
  """Removes temporary build files (``.knn_select-*``) older than ``max_age`` seconds."""
  now = time.time()
  try:
    entries = list(os.scandir(directory))
  except OSError:
    return
  for entry in entries:
    if not entry.name.startswith(_TMP_PREFIX):
      continue
    try:
      if now - entry.stat(follow_symlinks=False).st_mtime > max_age:
        os.unlink(entry.path)
    except OSError:
      pass  # gone already, or someone else's in a sticky directory


def _write_atomic(directory: Path, target: Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".sha256", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def _compile(cmd: list, cxx: str):
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise NativeBuildError(f"could not run the C++ compiler {cxx!r} ({e}); install one "
                           f"(e.g. g++) or point CXX at it, or set DMLJAX_NATIVE=0.") from e


def _build_in(directory: Path, cxx: str, include: str, jax_version: str) -> Path:
  """Verified library in ``directory``, built there if needed. Raises :class:`_Untrusted` when
  the directory cannot be used, :class:`NativeBuildError` when compiling fails."""
  try:
    if not directory.exists():
      directory.mkdir(parents=True, mode=0o700)
  except FileExistsError:
    pass
  except OSError as e:
    raise _Untrusted(f"cannot create {directory}: {e}") from e
  problem = _dir_problem(directory)
  if problem:
    raise _Untrusted(problem)
  source = _SOURCE.read_bytes()
  attempts = [("-march=native",), ()]  # some compilers/CPUs reject -march=native
  errors = []
  for extra in attempts:
    flags = _BASE_FLAGS + extra
    key = hashlib.sha256(b"\0".join([
        source, " ".join(flags).encode(), cxx.encode(), jax_version.encode(),
        _cpu_signature().encode()])).hexdigest()[:16]
    target = directory / f"knn_select-{key}.so"
    if verify_library(target) is None:
      return target
    with _build_lock(directory):
      _remove_stale_temps(directory)
      if verify_library(target) is None:  # a concurrent process built it meanwhile
        return target
      try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".so", dir=directory)
      except OSError as e:  # e.g. a read-only cache whose entry is missing or stale
        raise _Untrusted(f"cannot write in {directory}: {e}") from e
      os.close(fd)
      try:
        cmd = [cxx, *flags, f"-I{include}", str(_SOURCE), "-o", tmp]
        proc = _compile(cmd, cxx)
        if proc.returncode != 0:
          errors.append(f"$ {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
          continue
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
        try:
          os.replace(tmp, target)  # atomic; a process that has the old file mapped keeps it
          _write_atomic(directory, _sidecar(target), (digest + "\n").encode())
        except OSError as e:  # e.g. someone else's file of that name in a sticky directory
          raise _Untrusted(f"cannot replace {target} or its digest: {e}") from e
      finally:
        with contextlib.suppress(OSError):
          os.unlink(tmp)
    problem = verify_library(target)
    if problem:
      raise _Untrusted(f"the library just built does not verify: {problem}")
    return target
  raise NativeBuildError("compiling the kNN selection kernel failed:\n" + "\n".join(errors) +
                         "\nSet DMLJAX_NATIVE=0 to use the pure XLA path.")


def _fallback_dirs() -> list[Path]:
  """Per-user places to build into when the cache directory cannot be trusted."""
  uid = _uid()
  dirs = [_default_cache_dir(),
          Path(tempfile.gettempdir()) / f"dmljax-{uid if uid is not None else 'user'}"]
  return dirs


def build_library(directory: Optional[Path] = None, cxx: Optional[str] = None) -> Path:
  """A verified ``knn_select`` library, compiled into ``directory`` unless already there.

  Args:
    directory: where to build; None: :func:`cache_dir`, and if that cannot be trusted (see the
      module docstring) the per-user fallbacks, with a warning.
    cxx: the C++ compiler; None: ``$CXX`` or ``c++``.

  Returns:
    The path of the shared library (checked: :func:`verify_library`).

  Raises:
    NativeBuildError: no compiler, a compile error, jaxlib without the FFI headers, or no
      trustworthy directory; the message holds the compiler's output or the reasons, and how to
      proceed.
  """
  import jax
  if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
    raise NativeBuildError(f"jax {jax.__version__} has no jax.ffi; upgrade jax (>= 0.4.36) to use "
                           f"the compiled CPU kernels.")
  include = jax.ffi.include_dir()
  cxx = cxx or os.environ.get("CXX") or "c++"
  if directory is not None:
    candidates = [Path(directory)]
  else:
    candidates = [cache_dir()]
    for d in _fallback_dirs():
      if all(os.path.abspath(d) != os.path.abspath(c) for c in candidates):
        candidates.append(d)
  problems = []
  for d in candidates:
    try:
      path = _build_in(d, cxx, include, jax.__version__)
    except _Untrusted as e:
      problems.append(str(e))
      continue
    if problems:
      warnings.warn(f"dmljax: not using the kernel cache {candidates[0]}: "
                    f"{'; '.join(problems)}. Using {path} instead; point DMLJAX_CACHE_DIR at a "
                    f"directory only you can write to.", RuntimeWarning, stacklevel=2)
    return path
  raise NativeBuildError("found no trustworthy directory for the compiled kNN kernel: " +
                         "; ".join(problems) + ". Point DMLJAX_CACHE_DIR at a directory that "
                         "belongs to you and that nobody else can write to.")


def _register(path: Path) -> None:
  """Loads ``path`` (re-verified, through the descriptor that was hashed) and registers it."""
  import jax
  fd, problem = _open_verified(Path(path))
  if fd is None:
    raise NativeBuildError(f"refusing to load {path}: {problem}")
  try:
    # The descriptor's path names exactly the inode that was checked, whatever happens to the
    # file name meanwhile.
    by_fd = f"/proc/self/fd/{fd}"
    lib = ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
  finally:
    os.close(fd)
  jax.ffi.register_ffi_target(KNN_SELECT, jax.ffi.pycapsule(getattr(lib, _SYMBOL)),
                              platform="cpu")
  jax.ffi.register_ffi_target(PUT_COLUMNS, jax.ffi.pycapsule(getattr(lib, "DmljaxPutColumns")),
                              platform="cpu")
  for name, symbol in ((SYM_MERGE, "DmljaxSymMerge"), (SYM_SELECT, "DmljaxSymSelect")):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  _state["path"] = Path(path)


def available() -> bool:
  """Whether the compiled kNN selection is registered, building it on the first call.

  Returns False when disabled (``DMLJAX_NATIVE=0``) or when the build failed; a failure warns
  once, with the reason, and the kNN then uses the pure XLA path.
  """
  if not enabled():
    return False
  with _lock:
    if not _state["tried"]:
      _state["tried"] = True
      try:
        _register(build_library())
        _state["ok"] = True
      except (NativeBuildError, OSError, AttributeError) as e:
        _state["error"] = str(e)
        warnings.warn(f"dmljax: the compiled CPU kNN kernel is unavailable, using the slower "
                      f"pure XLA path. {e}", RuntimeWarning, stacklevel=2)
    return _state["ok"]


def error() -> Optional[str]:
  """Why the last build failed (None if it did not, or was not tried)."""
  return _state["error"]


def loaded_path() -> Optional[Path]:
  """The library registered in this process (None before :func:`available` succeeded)."""
  return _state["path"]
