"""One run per workdir: a lock file with the holder's host, pid and a heartbeat.

``train_and_evaluate`` (and ``dmljax.protocol`` for its directory) takes the lock at start-up,
before any data loads or anything compiles, and gives it back when it ends, whatever the end. A
second run on the same workdir is refused (:class:`WorkdirLocked`, exit status 2) with a message
that says "locked" and names the holder. The file, ``WORKDIR/dmljax.lock``, is JSON::

    {"host": "node17", "pid": 4242, "run_id": "node17:4242:1733500000.1", "started": 1733500000.1,
     "heartbeat": 1733500120.3, "processes": 4}

A thread of the holder rewrites ``heartbeat`` every :data:`HEARTBEAT_S` seconds. A lock is taken
over when its holder is gone: on the same host when its pid no longer exists (at once), on any
host when its heartbeat is older than :data:`STALE_S` seconds (``$DMLJAX_LOCK_STALE_S``), so a
preempted TPU slice or a killed job can be restarted on its workdir. Deleting the file by hand
releases the lock too.

Several processes (one multi-host run): process 0 takes the lock for all of them and the
outcome is broadcast to the others, so every process of the run either starts or stops with the
same message.

Local files are created with ``O_EXCL`` (atomic on POSIX file systems, NFS included since
v3). A bucket (``gs://``, through ``etils.epath``) has no exclusive create there: the lock is
written and read back, and a run that reads back another holder's id stops; two runs started
within the same fraction of a second on one bucket workdir can still both pass; the heartbeat
thread of the one that lost then finds the other's id and prints a warning naming it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from dmljax import errors

LOCK_FILE = "dmljax.lock"
#: Seconds between heartbeats.
HEARTBEAT_S = float(os.environ.get("DMLJAX_LOCK_HEARTBEAT_S", "30"))
#: A heartbeat older than this (seconds) means the holder is gone.
STALE_S = float(os.environ.get("DMLJAX_LOCK_STALE_S", "300"))


class WorkdirLocked(errors.DmljaxError, ValueError):
  """Another live run holds the workdir's lock."""


def _remote(path: str) -> bool:
  return "://" in str(path)


def _join(workdir: str, name: str) -> str:
  return f"{str(workdir).rstrip('/')}/{name}" if _remote(workdir) else os.path.join(workdir, name)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OSError):
    return True
  return True


class WorkdirLock:
  """The lock of one workdir (see the module docstring); a context manager."""

  def __init__(self, workdir: str, *, stale_s: Optional[float] = None,
               heartbeat_s: Optional[float] = None, processes: int = 1):
    self.workdir = str(workdir)
    self.path = _join(self.workdir, LOCK_FILE)
    self.stale_s = STALE_S if stale_s is None else float(stale_s)
    self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else float(heartbeat_s)
    self.host, self.pid = socket.gethostname(), os.getpid()
    self.started = time.time()
    self.run_id = f"{self.host}:{self.pid}:{self.started:.6f}"
    self.processes = processes
    self.held = False
    self.lost: Optional[dict] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # --------------------------------------------------------------- file access

  def _record(self) -> dict:
    return {"host": self.host, "pid": self.pid, "run_id": self.run_id, "started": self.started,
            "heartbeat": time.time(), "processes": self.processes}

  def _read(self) -> Optional[dict]:
    try:
      if _remote(self.path):
        from etils import epath  # pylint: disable=g-import-not-at-top
        text = epath.Path(self.path).read_text()
      else:
        with open(self.path) as f:
          text = f.read()
    except FileNotFoundError:
      return None
    try:
      rec = json.loads(text)
      return rec if isinstance(rec, dict) else {}
    except json.JSONDecodeError:
      return {}  # a holder killed mid-write: judged by the file's age

  def _write(self, rec: dict, exclusive: bool = False) -> bool:
    """Writes ``rec``; with ``exclusive`` only if no lock file exists (False if one does)."""
    text = json.dumps(rec)
    if _remote(self.path):
      from etils import epath  # pylint: disable=g-import-not-at-top
      p = epath.Path(self.path)
      if exclusive and p.exists():
        return False
      p.write_text(text)
      return True
    if exclusive:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      except OSError as e:
        raise OSError(f"cannot write in workdir {self.workdir} ({e.strerror}); give a writable "
                      "--workdir with free space") from e
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    tmp = f"{self.path}.tmp.{self.pid}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, self.path)
    return True

  def _age(self, rec: dict) -> float:
    beat = rec.get("heartbeat")
    if beat is None:  # unreadable: the file's own age
      try:
        if _remote(self.path):
          from etils import epath  # pylint: disable=g-import-not-at-top
          beat = epath.Path(self.path).stat().mtime
        else:
          beat = os.path.getmtime(self.path)
      except OSError:
        return float("inf")
    return time.time() - float(beat)

  # --------------------------------------------------------------- protocol

  def holder_gone(self, rec: dict) -> Optional[str]:
    """Why the holder ``rec`` no longer holds the lock (None if it may still run)."""
    age = self._age(rec)
    if rec.get("host") == self.host and rec.get("pid") is not None and not _pid_alive(
        rec["pid"]):
      return f"its process {rec['pid']} on this host has ended"
    if age > self.stale_s:
      return f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
    return None

  def describe(self, rec: dict) -> str:
    if not rec:
      return "an unreadable lock file"
    age = self._age(rec)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("started", 0)))
    return (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')} (started {started}, last "
            f"heartbeat {age:.0f} s ago)")

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises :class:`WorkdirLocked` naming the holder."""
    for _ in range(3):
      if self._write(self._record(), exclusive=True):
        break
      rec = self._read()
      if rec is None:
        continue  # released meanwhile: try again
      why = self.holder_gone(rec)
      if why is None:
        raise WorkdirLocked(
            f"workdir {self.workdir} is locked by another run: {self.describe(rec)}; wait for "
            f"it to end, stop it, or use another --workdir (a lock whose heartbeat is older "
            f"than {self.stale_s:.0f} s is taken over; deleting {self.path} releases it)")
      print(f"Taking over the lock of {self.workdir}: {why}.", flush=True)
      self._write(self._record())
      break
    else:
      raise WorkdirLocked(f"workdir {self.workdir}: the lock {self.path} keeps changing; is "
                          "another run starting there? Use another --workdir.")
    if _remote(self.path):
      time.sleep(0.2)  # no exclusive create on a bucket: read back who won
    rec = self._read() or {}
    if rec.get("run_id") != self.run_id:
      raise WorkdirLocked(f"workdir {self.workdir} is locked by another run that started at "
                          f"the same time: {self.describe(rec)}; use another --workdir")
    self.held = True
    if self.heartbeat_s > 0:
      self._thread = threading.Thread(target=self._beat, name="dmljax-lock", daemon=True)
      self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        rec = self._read() or {}
        if rec.get("run_id") != self.run_id:
          self.lost = rec
          import sys  # pylint: disable=g-import-not-at-top
          print(f"WARNING: the lock of {self.workdir} was taken by {self.describe(rec)}; two "
                "runs may now write this workdir: stop one of them.", file=sys.stderr,
                flush=True)
          return
        self._write(self._record())
      except OSError:
        pass  # a passing file system error: the next beat tries again

  def heartbeat(self) -> None:
    """Writes a heartbeat now (the thread does it every ``heartbeat_s`` seconds)."""
    if self.held:
      self._write(self._record())

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if not self.held:
      return
    self.held = False
    try:
      rec = self._read() or {}
      if rec.get("run_id") == self.run_id:
        if _remote(self.path):
          from etils import epath  # pylint: disable=g-import-not-at-top
          epath.Path(self.path).unlink()
        else:
          os.remove(self.path)
    except OSError:
      pass  # a read-only or full workdir: the stale heartbeat frees it later

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def acquire_for_run(workdir: str, **kwargs) -> Optional[WorkdirLock]:
  """The lock of ``workdir`` for this run: process 0 takes it for every process (the outcome
  is broadcast, so all processes start or all stop). Returns the lock (None on the others)."""
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  lock, error = None, None
  if index == 0:
    lock = WorkdirLock(workdir, processes=count, **kwargs)
    try:
      lock.acquire()
    except WorkdirLocked as e:
      error = e
  if count > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirLocked(f"workdir {workdir} is locked by another run (process 0 names the "
                            "holder); use another --workdir")
  if error is not None:
    raise error
  return lock


def main(argv=None) -> int:
  """``python -m dmljax.lock WORKDIR``: exit status 2 and the holder if a live run holds the
  workdir's lock, else 0 (free, or stale: a new run would take it over). The launchers ask this
  before starting a trainer."""
  import sys  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 1 or argv[0].startswith("-"):
    print("Usage: python -m dmljax.lock WORKDIR", file=sys.stderr)
    return 2
  probe = WorkdirLock(argv[0], heartbeat_s=0)
  try:
    rec = probe._read()  # pylint: disable=protected-access
  except OSError as e:
    print(f"python -m dmljax.lock: error: cannot read {probe.path} ({e})", file=sys.stderr)
    return 2
  if rec is None:
    print(f"{argv[0]}: not locked")
    return 0
  why = probe.holder_gone(rec) if rec else None
  if why is not None:
    print(f"{argv[0]}: lock is stale ({why}); a new run takes it over")
    return 0
  print(f"{argv[0]} is locked by {probe.describe(rec)}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  import sys as _sys  # pylint: disable=g-import-not-at-top
  _sys.exit(main())
