"""Compiled CPU kernels, built on first use with the machine's C++ compiler.

On a CPU host, XLA's ``top_k`` and gathers cost a few nanoseconds per element, which made the
selection step of the blocked kNN (:mod:`dmljax.kernels.knn`) almost half as expensive as its
matrix product. ``knn_select.cc`` does that step as an XLA FFI custom call (same order, same
tie-breaking); the matrix product stays in XLA. Nothing here is needed on GPU or TPU, and nothing
changes a result beyond the last-bit rounding of re-scored dot products.

The library is compiled once per source version, compiler flags and CPU, into
``$DMLJAX_CACHE_DIR`` (default ``~/.cache/dmljax``), written atomically so that concurrent
processes can build it side by side. The compiler is ``$CXX`` or ``c++``; the XLA FFI headers come
with jaxlib (``jax.ffi.include_dir()``). If anything fails, the kNN warns once and uses the pure
XLA path. ``DMLJAX_NATIVE=0`` turns the compiled path off.

    python -m dmljax.kernels.native   # builds now and prints where the library is
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["KNN_SELECT", "NativeBuildError", "enabled", "available", "error", "build_library",
           "cache_dir"]

#: Name of the FFI target of the kNN selection step.
KNN_SELECT = "dmljax_knn_select"
_SOURCE = Path(__file__).with_name("knn_select.cc")
_SYMBOL = "DmljaxKnnSelect"
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


class NativeBuildError(RuntimeError):
  """The compiled kernels could not be built or loaded; the message says why and what to do."""


_lock = threading.Lock()
_state: dict = {"tried": False, "ok": False, "error": None}


def enabled() -> bool:
  """False when ``DMLJAX_NATIVE=0`` (or ``false``/``off``) is set."""
  return os.environ.get("DMLJAX_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
  """Where built libraries go: ``$DMLJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/dmljax``, else
  ``~/.cache/dmljax``."""
  if os.environ.get("DMLJAX_CACHE_DIR"):
    return Path(os.environ["DMLJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "dmljax"


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


def build_library(directory: Optional[Path] = None, cxx: Optional[str] = None) -> Path:
  """Compiles ``knn_select.cc`` into ``directory`` (default :func:`cache_dir`) unless built.

  Returns:
    The path of the shared library.

  Raises:
    NativeBuildError: no compiler, a compile error, or jaxlib without the FFI headers; the
      message holds the compiler's output and how to proceed.
  """
  import jax
  if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
    raise NativeBuildError(f"jax {jax.__version__} has no jax.ffi; upgrade jax (>= 0.4.36) to use "
                           f"the compiled CPU kernels.")
  include = jax.ffi.include_dir()
  cxx = cxx or os.environ.get("CXX") or "c++"
  directory = Path(directory or cache_dir())
  source = _SOURCE.read_bytes()
  attempts = [("-march=native",), ()]  # some compilers/CPUs reject -march=native
  errors = []
  for extra in attempts:
    flags = _BASE_FLAGS + extra
    key = hashlib.sha256(b"\0".join([
        source, " ".join(flags).encode(), cxx.encode(), jax.__version__.encode(),
        _cpu_signature().encode()])).hexdigest()[:16]
    target = directory / f"knn_select-{key}.so"
    if target.exists():
      return target
    try:
      directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise NativeBuildError(f"cannot create the kernel cache directory {directory}: {e}; set "
                             f"DMLJAX_CACHE_DIR to a writable directory.") from e
    fd, tmp = tempfile.mkstemp(prefix=".knn_select-", suffix=".so", dir=directory)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{include}", str(_SOURCE), "-o", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
      os.unlink(tmp)
      raise NativeBuildError(f"could not run the C++ compiler {cxx!r} ({e}); install one "
                             f"(e.g. g++) or point CXX at it, or set DMLJAX_NATIVE=0.") from e
    if proc.returncode == 0:
      os.replace(tmp, target)  # atomic: a concurrent build writes the same bytes
      return target
    os.unlink(tmp)
    errors.append(f"$ {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
  raise NativeBuildError("compiling the kNN selection kernel failed:\n" + "\n".join(errors) +
                         "\nSet DMLJAX_NATIVE=0 to use the pure XLA path.")


def _register(path: Path) -> None:
  import jax
  lib = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(KNN_SELECT, jax.ffi.pycapsule(getattr(lib, _SYMBOL)),
                              platform="cpu")


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

