"""Multi-process start-up: ``jax.distributed.initialize`` when, and only when, it is needed.

``python -m dmljax.main`` calls :func:`maybe_initialize` after parsing its flags and before
anything touches a JAX backend. It initialises ``jax.distributed`` in one of two cases:

* **explicitly**: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
  environment variables ``DMLJAX_COORDINATOR_ADDRESS``, ``DMLJAX_NUM_PROCESSES``,
  ``DMLJAX_PROCESS_ID``, ``DMLJAX_LOCAL_DEVICE_IDS``; a flag wins over its variable), with
  ``N > 1``. ``N == 1`` is an ordinary single-process run.
* **detected**, when the environment says there are several processes:

  - **SLURM**: an ``srun`` step (the variables ``jax._src.clusters.SlurmCluster`` looks for:
    ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``) with more than one task (``SLURM_STEP_NUM_TASKS``, else
    ``SLURM_NTASKS``). The batch script itself (no ``SLURM_STEP_NODELIST``) and ``srun -n 1``
    are single processes. The coordinator is the step's first node, on the port jax would pick
    (``JAX_COORDINATOR_PORT``, else derived from the job id), so every task agrees on it
    without talking to anyone.
  - **Cloud TPU**: a TPU VM (``jax`` found TPU chips and ``libtpu`` on import) that belongs to a
    multi-host slice: more than one worker in ``TPU_PROCESS_ADDRESSES`` / ``TPU_WORKER_HOSTNAMES``
    (GKE), times ``MEGASCALE_NUM_SLICES``, or else in the VM metadata's
    ``worker-network-endpoints`` (GCE TPU VMs; the query jax itself makes). Then
    ``jax.distributed.initialize()`` runs without arguments and jax finds the coordinator
    (worker 0) itself. A single-host slice (``v4-8``) is a single process.

Nothing else is guessed: on a laptop, a single GPU box, a login node, inside ``salloc`` without
``srun``, or on a one-host TPU VM no coordinator is ever contacted. ``DMLJAX_DISTRIBUTED``
(``--distributed``) changes the policy: ``auto`` (the default, as above), ``on`` (always call
``jax.distributed.initialize`` and let jax detect the rest: Open MPI, Kubernetes, ...) or
``off`` (never; explicit multi-process flags are then an error).

Devices: under SLURM every process uses all the accelerators it can see. Give each task its
own GPU with ``srun --gpus-per-task=1`` (SLURM then sets ``CUDA_VISIBLE_DEVICES`` per task), or
choose devices with ``--local_device_ids``. (jax's own SLURM detection would instead restrict a
process to the device numbered ``SLURM_LOCALID``, which is wrong for one process per node.)

On CPU, cross-process collectives need gloo, which is set up before initialising when no other
implementation was configured.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Mapping, Optional, Sequence, Union

ENV_COORDINATOR = "DMLJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DMLJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DMLJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DMLJAX_LOCAL_DEVICE_IDS"
ENV_MODE = "DMLJAX_DISTRIBUTED"
MODES = ("auto", "on", "off")

# What jax's SlurmCluster.is_env_present requires (an srun step).
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")

__all__ = ["Plan", "plan", "maybe_initialize", "is_primary", "slurm_plan", "tpu_process_count",
           "parse_device_ids", "MODES"]


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to call ``jax.distributed.initialize`` (``None`` fields: jax detects them).

  Attributes:
    source: where the values came from: ``"flags"`` (flags or DMLJAX_* variables),
      ``"slurm"``, ``"tpu"`` or ``"jax"`` (``--distributed=on``: jax's own detection).
    coordinator_address: ``HOST:PORT`` of process 0's coordinator service.
    num_processes: number of processes.
    process_id: this process's index in ``0 .. num_processes - 1``.
    local_device_ids: the local devices this process uses (``None``: all it sees).
  """
  source: str
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  local_device_ids: Optional[tuple[int, ...]] = None

  def initialize_kwargs(self) -> dict:
    """Keyword arguments of ``jax.distributed.initialize`` for this plan."""
    kwargs = {"coordinator_address": self.coordinator_address,
              "num_processes": self.num_processes, "process_id": self.process_id,
              "local_device_ids": (None if self.local_device_ids is None
                                   else list(self.local_device_ids))}
    if None not in (self.coordinator_address, self.num_processes, self.process_id):
      # Everything is known: keep jax from overriding it (jax's SLURM detection would pin each
      # process to the device numbered SLURM_LOCALID when local_device_ids is None).
      kwargs["cluster_detection_method"] = "deactivate"
    return kwargs


# ============================================================================= parsing


def _int(value, what: str) -> Optional[int]:
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what}={value!r} is not an integer.") from None


def parse_device_ids(value: Union[None, str, int, Sequence[int]],
                     what: str = "--local_device_ids") -> Optional[tuple[int, ...]]:
  """``"0,1"`` / ``[0, 1]`` / ``3`` -> a tuple of ints; ``None`` or ``""`` -> ``None``."""
  if value is None:
    return None
  if isinstance(value, int):
    value = [value]
  if isinstance(value, str):
    if not value.strip():
      return None
    value = [v for v in value.split(",") if v.strip()]
  try:
    ids = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{what}={value!r}: expected comma-separated device numbers, e.g. 0,1."
                     ) from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise ValueError(f"{what}={value!r}: device numbers must be distinct and >= 0.")
  return ids or None


def _check_address(address: str, what: str = "--coordinator_address") -> str:
  host, sep, port = address.strip().rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{what}={address!r}: expected HOST:PORT (e.g. 10.0.0.1:1234 or "
                     "node001:12345) with a port in 1..65535.")
  return address.strip()


# ============================================================================= detection


def _first_slurm_host(node_list: str) -> str:
  """The first host name of a SLURM node list (``node[001-004],gpu7`` -> ``node001``)."""
  node_list = node_list.strip()
  cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
  if cut == len(node_list) or node_list[cut] == ",":
    return node_list[:cut]
  prefix, rest = node_list[:cut], node_list[cut + 1:]
  end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
  return prefix + rest[:end]


def slurm_plan(env: Mapping[str, str]) -> Optional[Plan]:
  """The multi-process plan of a SLURM ``srun`` step, or ``None`` (not a step, or one task).

  Args:
    env: the environment (``os.environ`` or a dict in tests).

  Returns:
    ``Plan(source="slurm", ...)`` with the coordinator on the step's first node (port
    ``JAX_COORDINATOR_PORT``, else jax's choice ``61440 + job_id % 4096``), the step's task count
    and ``SLURM_PROCID``; ``None`` outside an srun step or with a single task.
  """
  if not all(v in env for v in SLURM_STEP_VARS):
    return None
  what = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
  count = _int(env[what], what)
  if count is None or count <= 1:
    return None
  process_id = _int(env["SLURM_PROCID"], "SLURM_PROCID")
  if process_id is None or not 0 <= process_id < count:
    raise ValueError(f"SLURM_PROCID={env['SLURM_PROCID']!r} is not in 0..{count - 1} "
                     f"({what}={count}).")
  port = env.get("JAX_COORDINATOR_PORT") or str(
      _int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1))
  host = _first_slurm_host(env["SLURM_STEP_NODELIST"])
  return Plan("slurm", _check_address(f"{host}:{port}", "SLURM coordinator"), count, process_id)


def _on_cloud_tpu_vm() -> bool:
  """Whether ``import jax`` found TPU chips and libtpu (``jax._src.cloud_tpu_init``)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover  (another jax layout)
    return False
  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _gce_tpu_worker_count() -> int:
  """Workers of this GCE TPU VM's slice, from the metadata server (0 if unknown)."""
  try:
    from jax._src.clusters import cloud_tpu_cluster as tpu  # pylint: disable=g-import-not-at-top
    if not tpu.GceTpuCluster.is_env_present():
      return 0
    return len(tpu.GceTpuCluster._get_worker_list_in_slice())  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    print(f"dmljax: could not read the TPU VM metadata ({type(e).__name__}: {e}); assuming a "
          "single host (pass --distributed=on on a multi-host slice).", file=sys.stderr)
    return 0


def tpu_process_count(env: Mapping[str, str], *, on_tpu_vm: Optional[bool] = None,
                      gce_worker_count: Optional[Callable[[], int]] = None) -> int:
  """Processes of the Cloud TPU slice(s) this VM belongs to; 0 when not on a TPU VM.

  Args:
    env: the environment.
    on_tpu_vm: whether this is a TPU VM (default: what ``import jax`` found).
    gce_worker_count: returns the slice's worker count from the VM metadata (default: jax's
      metadata query); called only on a TPU VM without the GKE variables.
  """
  if not (_on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm):
    return 0
  slices = _int(env.get("MEGASCALE_NUM_SLICES"), "MEGASCALE_NUM_SLICES") or 1
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if hosts:
    workers = len([h for h in hosts.split(",") if h.strip()])
  elif env.get("TPU_SKIP_MDS_QUERY") is not None:
    workers = 1
  else:
    workers = (gce_worker_count or _gce_tpu_worker_count)()
  return workers * slices if workers else 0


# ============================================================================= the plan


def plan(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None,
         local_device_ids: Union[None, str, Sequence[int]] = None, *,
         mode: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
         tpu_count: Optional[Callable[[], int]] = None) -> Optional[Plan]:
  """Decides whether and how to initialise ``jax.distributed``; contacts nothing.

  Arguments left ``None`` are read from the ``DMLJAX_*`` variables of ``env``. See the module
  docstring for the rules.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0.
    num_processes: total number of processes.
    process_id: index of this process.
    local_device_ids: devices of this process (``"0,1"`` or a sequence; default all visible).
    mode: ``auto`` / ``on`` / ``off`` (default ``DMLJAX_DISTRIBUTED``, else ``auto``).
    env: environment to read (default ``os.environ``).
    tpu_count: returns the TPU slice's process count (default :func:`tpu_process_count`).

  Returns:
    A :class:`Plan`, or ``None`` for a single-process run.

  Raises:
    ValueError: inconsistent or malformed values (one-line message naming the flags).
  """
  env = os.environ if env is None else env
  mode = (mode or env.get(ENV_MODE) or "auto").strip().lower()
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} (or {ENV_MODE}): expected one of "
                     f"{', '.join(MODES)}.")
  if coordinator_address is None:
    coordinator_address = env.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if local_device_ids is None:
    local_device_ids = env.get(ENV_LOCAL_DEVICE_IDS)
  devices = parse_device_ids(local_device_ids)

  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  if explicit:
    if num_processes is None:
      given = "--coordinator_address" if coordinator_address is not None else "--process_id"
      raise ValueError(f"{given} needs --num_processes (the total number of processes).")
    if num_processes < 1:
      raise ValueError(f"--num_processes={num_processes}: must be >= 1.")
    if process_id is not None and not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1} "
                       f"(--num_processes={num_processes}).")
    if num_processes > 1:
      if mode == "off":
        raise ValueError(f"--num_processes={num_processes} contradicts --distributed=off.")
      if coordinator_address is None and mode != "on":
        raise ValueError(f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT "
                         "(the address of process 0, the same for every process).")
      if process_id is None and mode != "on":
        raise ValueError(f"--num_processes={num_processes} needs --process_id (0.."
                         f"{num_processes - 1}, a different one for each process).")
    if coordinator_address is not None:
      coordinator_address = _check_address(coordinator_address)
    if num_processes > 1 or mode == "on":
      return Plan("flags", coordinator_address, num_processes, process_id, devices)
    return None  # --num_processes=1: a single process
  if mode == "off":
    return None
  slurm = slurm_plan(env)
  if slurm is not None:
    return dataclasses.replace(slurm, local_device_ids=devices)
  if mode == "on":
    return Plan("jax", local_device_ids=devices)
  count = (tpu_count or (lambda: tpu_process_count(env)))()
  if count > 1:
    return Plan("tpu", num_processes=count, local_device_ids=devices)
  return None


def maybe_initialize(coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None, process_id: Optional[int] = None,
                     local_device_ids: Union[None, str, Sequence[int]] = None, *,
                     mode: Optional[str] = None) -> bool:
  """Initialises ``jax.distributed`` if this is one of several processes (see :func:`plan`).

  Must run before any JAX computation (or ``jax.devices()``). Calling it again once initialised
  does nothing.

  Args:
    coordinator_address: ``HOST:PORT`` of process 0 (default ``DMLJAX_COORDINATOR_ADDRESS``).
    num_processes: total number of processes (default ``DMLJAX_NUM_PROCESSES``).
    process_id: index of this process (default ``DMLJAX_PROCESS_ID``).
    local_device_ids: devices of this process (default ``DMLJAX_LOCAL_DEVICE_IDS``, else all).
    mode: ``auto`` / ``on`` / ``off`` (default ``DMLJAX_DISTRIBUTED``, else ``auto``).

  Returns:
    True if ``jax.distributed`` is initialised (now or before), False for a single process.

  Raises:
    ValueError: inconsistent flags, or jax failed to start or join the coordinator.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():
    return True
  p = plan(coordinator_address, num_processes, process_id, local_device_ids, mode=mode)
  if p is None:
    return False
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = p.initialize_kwargs()
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    where = (f" with coordinator {p.coordinator_address}" if p.coordinator_address else "")
    raise ValueError(f"jax.distributed.initialize ({p.source}){where} failed: "
                     f"{' '.join(str(e).split())}") from e
  print(f"dmljax: jax.distributed initialised ({p.source}): process {jax.process_index()} of "
        f"{jax.process_count()}, {jax.local_device_count()} local of {jax.device_count()} "
        "devices", file=sys.stderr, flush=True)
  return True


def is_primary() -> bool:
  """True in process 0 (the one that writes logs, metrics and summaries); True when alone."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of the run gets here (a no-op with one process).

  Used after the preemption save: no process exits (with :data:`dmljax.cli.EXIT_PREEMPTED`)
  before all have saved, so ``srun --kill-on-bad-exit`` cannot kill one mid-save.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
