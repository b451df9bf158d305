"""PyTorch weight import without PyTorch: a restricted ``.pth`` reader and per-backbone converters.

**Reading.** :func:`load_state_dict` reads what ``torch.save(model.state_dict(), path)`` writes,
in both formats: the zip format (PyTorch >= 1.6: ``<name>/data.pkl`` plus one
``<name>/data/<key>`` record per storage) and the legacy stream (magic number, protocol, system
info, the pickle, the storage keys, then each storage as an int64 element count and its bytes;
the format of older weight files such as ``bn_inception-52deb4733.pth``). The pickle is read by
an unpickler that resolves only the globals a tensor state dict needs
(``torch._utils._rebuild_tensor_v2`` and friends, the ``torch.*Storage`` types,
``collections.OrderedDict``, ``torch.Size``); any other global (``os.system``, a module class,
...) stops the read with :class:`UnsafeWeightFile` before anything is called. Tensors become
numpy arrays; PyTorch is not imported.

**Converting.** A Flax variable's PyTorch name is its module path mapped by the backbone's rule
(:data:`ARCHS`) plus the leaf's PyTorch name (``kernel``/``scale`` -> ``weight``, ``bias``,
``mean`` -> ``running_mean``, ``var`` -> ``running_var``); conv kernels go OIHW -> HWIO, linear
ones OI -> IO. Every expected tensor must be in the file with the expected shape (BatchNorm
vectors stored as ``[1, C]``, as some BN-Inception files do, are squeezed); file tensors that no
variable takes are errors too, except ``num_batches_tracked`` and the backbone's classifier
(``fc``, ``last_linear``, GoogLeNet's ``aux1`` / ``aux2``). All problems are reported in one
``ValueError``.

**Caching.** :func:`import_torch_weights` stores the converted variables as
``<cache>/<arch>-<sha256 of the file>.npz`` (default cache ``~/.cache/dmljax/weights``, or
``$DMLJAX_WEIGHTS_CACHE``), and later calls with the same file load that directly.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import pickle
import re
import struct
import tempfile
import zipfile
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmljax.models import bn_inception

# ============================================================================= reading .pth

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class UnsafeWeightFile(pickle.UnpicklingError, ValueError):
  """The weight file's pickle names a global outside the tensor allow-list (a ValueError too)."""


def _storage_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (ships with jax)
  return {
      "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
      "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
      "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
      "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
      "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
  }


class _StorageType:
  """Stands for ``torch.FloatStorage`` and the like inside the pickle: just a dtype."""

  def __init__(self, name: str, dtype: np.dtype):
    self.name, self.dtype = name, dtype


class _Storage:
  """A storage named in the pickle; its bytes are attached once read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, int(numel)
    self.array: Optional[np.ndarray] = None


@dataclasses.dataclass
class _TensorRef:
  """A tensor as the pickle describes it; becomes a numpy array once its storage is read."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple

  def materialise(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise ValueError("weight file: a tensor's storage has no data record.")
    size = tuple(int(s) for s in self.size)
    stride = tuple(int(s) for s in self.stride)
    if len(size) != len(stride):
      raise ValueError(f"weight file: tensor size {size} and stride {stride} disagree.")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or self.offset < 0:
      raise ValueError("weight file: negative tensor size, stride or offset.")
    if 0 in size:
      return np.zeros(size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
      raise ValueError(f"weight file: tensor (offset {self.offset}, size {size}, stride "
                       f"{stride}) reaches past its storage of {flat.size} elements.")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
        writeable=False)
    return np.array(view)  # a contiguous copy


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2`` (extra arguments ignored)."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _Storage):
    raise UnsafeWeightFile("weight file: a tensor rebuilt from something that is not a storage.")
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  """``torch._utils._rebuild_parameter(_with_state)``: the parameter's data."""
  del unused
  return data


def _make_size(*args):
  return tuple(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): _make_size,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler resolving only :data:`_ALLOWED_GLOBALS` and the storage types."""

  def __init__(self, file, source: str, persistent_load: Callable):
    super().__init__(file, encoding="utf-8")
    self._source = source
    self._persistent = persistent_load
    self._dtypes = _storage_dtypes()

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in self._dtypes:
      return _StorageType(name, self._dtypes[name])
    hint = (" (a whole pickled model? save model.state_dict() instead)"
            if module.startswith("torch.nn") or module == "__main__" else "")
    raise UnsafeWeightFile(
        f"{self._source}: refusing to load global {module}.{name}{hint}; a weight file may "
        "only hold tensors (torch._utils._rebuild_tensor_v2, torch.*Storage), "
        "collections.OrderedDict and plain containers.")

  def persistent_load(self, pid):
    return self._persistent(pid)


def _decode(s):
  return s.decode("ascii") if isinstance(s, bytes) else s


def _materialise(obj):
  """Replaces every :class:`_TensorRef` in plain containers by its numpy array."""
  if isinstance(obj, _TensorRef):
    return obj.materialise()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: a zip weight file must hold exactly one <name>/data.pkl; "
                       f"found {pkls or 'none'}.")
    prefix = pkls[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      if not isinstance(pid, tuple) or not pid or _decode(pid[0]) != "storage":
        raise UnsafeWeightFile(f"{path}: unexpected persistent id {pid!r}.")
      _, stype, key, _location, numel = pid[:5]
      if not isinstance(stype, _StorageType):
        raise UnsafeWeightFile(f"{path}: storage of unknown type {stype!r}.")
      key = str(_decode(key))
      if key not in storages:
        storages[key] = _Storage(stype.dtype, numel)
      return storages[key]

    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, persistent_load).load()
    for key, st in storages.items():
      rec = f"{prefix}data/{key}"
      if rec not in names:
        raise ValueError(f"{path}: storage record {rec} is missing.")
      dt = st.dtype.newbyteorder("<" if byteorder == "little" else ">")
      raw = zf.read(rec)
      if len(raw) < st.numel * dt.itemsize:
        raise ValueError(f"{path}: storage record {rec} holds {len(raw)} bytes, needs "
                         f"{st.numel * dt.itemsize}.")
      st.array = np.frombuffer(raw, dt, count=st.numel).astype(st.dtype.newbyteorder("="))
  return _materialise(obj)


def _read_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    plain = lambda: _RestrictedUnpickler(f, path, _no_persistent).load()  # noqa: E731
    try:
      magic = plain()
    except UnsafeWeightFile:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: neither a zip nor a legacy PyTorch weight file ({e}).") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch weight file (bad magic number).")
    protocol = plain()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy PyTorch protocol {protocol!r}.")
    sys_info = plain()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    roots: dict[str, _Storage] = {}
    views: list[tuple[str, _Storage, int]] = []

    def persistent_load(pid):
      if not isinstance(pid, tuple) or not pid or _decode(pid[0]) != "storage":
        raise UnsafeWeightFile(f"{path}: unexpected persistent id {pid!r}.")
      _, stype, root_key, _location, numel, view = pid[:6]
      if not isinstance(stype, _StorageType):
        raise UnsafeWeightFile(f"{path}: storage of unknown type {stype!r}.")
      root_key = str(_decode(root_key))
      if root_key not in roots:
        roots[root_key] = _Storage(stype.dtype, numel)
      if view is None:
        return roots[root_key]
      _view_key, offset, view_size = view
      st = _Storage(stype.dtype, view_size)
      views.append((root_key, st, int(offset)))
      return st

    obj = _RestrictedUnpickler(f, path, persistent_load).load()
    keys = plain()
    dt_order = "<" if little else ">"
    for key in keys:
      key = str(_decode(key))
      if key not in roots:
        raise ValueError(f"{path}: storage {key} listed but never used.")
      st = roots[key]
      header = f.read(8)
      if len(header) != 8:
        raise ValueError(f"{path}: truncated before storage {key}.")
      numel = struct.unpack(dt_order + "q", header)[0]
      dt = st.dtype.newbyteorder(dt_order)
      raw = f.read(numel * dt.itemsize)
      if len(raw) != numel * dt.itemsize:
        raise ValueError(f"{path}: storage {key} truncated.")
      st.array = np.frombuffer(raw, dt).astype(st.dtype.newbyteorder("="))
    for root_key, st, offset in views:
      st.array = roots[root_key].array[offset:offset + st.numel]
  return _materialise(obj)


def _no_persistent(pid):
  raise UnsafeWeightFile(f"unexpected persistent id {pid!r} outside the main pickle.")


def _find_state_dict(obj, path: str) -> dict[str, np.ndarray]:
  """The ``{name: array}`` mapping the file held (a state dict, or ``{"state_dict": ...}``)."""
  if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    sd = obj
  elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    return _find_state_dict(obj["state_dict"], path)
  else:
    raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}"
                     f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, Mapping) else ''}.")
  sd = collections.OrderedDict((str(k), v) for k, v in sd.items())
  if all(k.startswith("module.") for k in sd):  # saved from DataParallel
    sd = collections.OrderedDict((k[len("module."):], v) for k, v in sd.items())
  return sd


def load_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a ``torch.save``-d state dict (zip or legacy format) as numpy arrays, safely.

  Args:
    path: the ``.pth`` / ``.pt`` file.

  Returns:
    ``OrderedDict`` of tensor name -> numpy array (PyTorch's dtype; bfloat16 as ml_dtypes').

  Raises:
    UnsafeWeightFile: the pickle names a global outside the allow-list (nothing is executed).
    ValueError: not a PyTorch file, truncated, or not a state dict.
    FileNotFoundError: no such file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file {path!r} not found.")
  if zipfile.is_zipfile(path):
    obj = _read_zip(path)
  else:
    with open(path, "rb") as f:
      head = f.read(512)
    if head.startswith(b"PK\x03\x04"):  # a zip whose end (its directory) is missing
      raise ValueError(f"{path}: a truncated or damaged zip weight file (its table of contents "
                       "is missing: did the download finish?); download it again.")
    if not head:
      raise ValueError(f"{path}: an empty file; download the weight file again.")
    if len(head) >= 262 and head[257:262] == b"ustar":
      raise ValueError(f"{path}: a tar-format weight file (PyTorch < 0.1.10) is not supported; "
                       "re-save it with a recent torch: torch.save(torch.load(f), g).")
    obj = _read_legacy(path)
  return _find_state_dict(obj, path)


# ============================================================================= converters


def dotted_torch_name(module_path: tuple[str, ...]) -> str:
  """``("layer1_0", "downsample_1")`` -> ``layer1.0.downsample.1``: ``_<int>`` is a list index."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in module_path)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """How one backbone's Flax variables map onto its PyTorch state dict.

  Attributes:
    torch_name: Flax module path -> PyTorch module name.
    ignored_prefixes: PyTorch names that are accepted and dropped (classifiers, aux heads).
    first_conv: name of the first conv weight, to read the input channels from.
    infer_in_channels: take the input channels from ``first_conv`` (else 3).
    init_size: spatial size used to trace the model's variable shapes.
    weight_file: the usual name of the pretrained weight file (documentation only).
    infer_options: backbone options read from the file (small_cnn: its widths), else defaults.
  """
  torch_name: Callable[[tuple[str, ...]], str]
  ignored_prefixes: tuple[str, ...]
  first_conv: str
  infer_in_channels: bool = False
  init_size: int = 224
  weight_file: str = ""
  infer_options: Optional[Callable[[Mapping[str, np.ndarray]], dict]] = None


def _small_cnn_options(state_dict: Mapping[str, np.ndarray]) -> dict:
  """``widths`` of a small_cnn file: the output channels of ``Conv.0``, ``Conv.1``, ... in order.

  A file saved from ``convs_per_block = 2`` reads as one conv per block with each width twice:
  the variables (names and shapes) are the same, and the model loading it checks its own tree.
  """
  convs = sorted((int(m.group(1)), np.shape(v)[0]) for k, v in state_dict.items()
                 if (m := re.fullmatch(r"Conv\.(\d+)\.weight", k)) and len(np.shape(v)) == 4)
  return {"widths": tuple(int(w) for _, w in convs)} if convs else {}


#: Backbones with a PyTorch layout, by ``config.model.name``. ``small_cnn`` has no PyTorch
#: original: its layout (``Conv.<i>.weight`` OIHW, ``BatchNorm.<i>.weight/bias/running_mean/
#: running_var``, optional ``classifier.*`` ignored) is the one :func:`save_state_dict` writes for
#: the glyphs pretraining (``python -m dmljax.pretrain``), so the shipped glyphs trunk goes
#: through the same reader and converter as the ImageNet files.
ARCHS: dict[str, ArchSpec] = {
    "bn_inception": ArchSpec(bn_inception.torch_name, ("last_linear.",), "conv1_7x7_s2.weight",
                             weight_file="bn_inception-52deb4733.pth"),
    "googlenet": ArchSpec(dotted_torch_name, ("fc.", "aux1.", "aux2."), "conv1.conv.weight",
                          weight_file="googlenet-1378be20.pth"),
    "resnet50": ArchSpec(dotted_torch_name, ("fc.",), "conv1.weight",
                         weight_file="resnet50-0676ba61.pth (or resnet50-11ad3fa6.pth, V2)"),
    "resnet_v2_20": ArchSpec(dotted_torch_name, ("fc.",), "conv1.weight", infer_in_channels=True,
                             init_size=32),
    "small_cnn": ArchSpec(dotted_torch_name, ("classifier.",), "Conv.0.weight",
                          infer_in_channels=True, init_size=32,
                          weight_file="dmljax/weights/small_cnn_glyphs.pth",
                          infer_options=_small_cnn_options),
}

_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
_ALWAYS_IGNORED = ("num_batches_tracked",)


def _check_arch(arch: str) -> ArchSpec:
  if arch not in ARCHS:
    raise ValueError(f"No PyTorch weight import for {arch!r}; importable: {sorted(ARCHS)}.")
  return ARCHS[arch]


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def expected_shapes(arch: str, in_channels: int = 3, **options
                    ) -> dict[tuple[str, ...], tuple[int, ...]]:
  """``{(collection, *module_path, leaf): shape}`` of :func:`get_backbone` ``(arch, **options)``'s
  variables.

  Traced with ``jax.eval_shape`` (no compilation, no memory).
  """
  from dmljax.models.cnn import get_backbone  # pylint: disable=g-import-not-at-top
  spec = _check_arch(arch)
  module = get_backbone(arch, **options)
  x = jax.ShapeDtypeStruct((1, spec.init_size, spec.init_size, in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def torch_key(arch: str, path: tuple[str, ...]) -> str:
  """PyTorch state-dict name of the Flax variable ``(collection, *module_path, leaf)``."""
  spec = _check_arch(arch)
  leaf = _LEAF_NAMES.get((path[0], path[-1]))
  if leaf is None:
    raise ValueError(f"{arch}: no PyTorch name for variable {'/'.join(path)}.")
  return f"{spec.torch_name(tuple(path[1:-1]))}.{leaf}"


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if leaf == "kernel" and len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _from_torch(arr: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
  arr = np.asarray(arr, np.float32)
  if leaf == "kernel" and ndim == 4:
    return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
  if leaf == "kernel" and ndim == 2:
    return np.ascontiguousarray(arr.T)
  return arr


def _squeezable(file_shape, want) -> bool:
  """A ``[1, C]``-style tensor for a ``[C]`` variable: same sizes once the 1s are dropped."""
  drop = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
  return (int(np.prod(file_shape)) == int(np.prod(want)) and drop(file_shape) == drop(want))


@dataclasses.dataclass
class ImportReport:
  """What a conversion matched.

  Attributes:
    matched: PyTorch names taken into the Flax variables.
    squeezed: of those, the ones reshaped from ``[1, C]``-style shapes.
    ignored: file tensors dropped on purpose (classifier, ``num_batches_tracked``).
  """
  matched: list[str]
  squeezed: list[str]
  ignored: list[str]


def _fmt(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def convert_state_dict(arch: str, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
                       ) -> tuple[dict, ImportReport]:
  """PyTorch state dict -> ``{"params", "batch_stats"}`` of :func:`get_backbone` ``(arch)``.

  Args:
    arch: a key of :data:`ARCHS`.
    state_dict: name -> array in PyTorch layout (e.g. from :func:`load_state_dict`).
    source: named in the error message.

  Returns:
    ``(variables, report)``: nested dicts of float32 numpy arrays, and an :class:`ImportReport`.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped tensor (name and shapes).
  """
  spec = _check_arch(arch)
  in_channels = 3
  if spec.infer_in_channels and spec.first_conv in state_dict:
    shape = np.shape(state_dict[spec.first_conv])
    if len(shape) == 4:
      in_channels = int(shape[1])
  options = spec.infer_options(state_dict) if spec.infer_options else {}
  want = expected_shapes(arch, in_channels, **options)
  flat, matched, squeezed, taken = {}, [], [], set()
  missing, misshaped = [], []
  for path, shape in want.items():
    name = torch_key(arch, path)
    tshape = _torch_shape(shape, path[-1])
    if name not in state_dict:
      missing.append(f"{name} {_fmt(tshape)}")
      continue
    taken.add(name)
    arr = np.asarray(state_dict[name])
    if tuple(arr.shape) != tshape:
      if _squeezable(arr.shape, tshape):
        arr = arr.reshape(tshape)
        squeezed.append(name)
      else:
        misshaped.append(f"{name}: file {_fmt(arr.shape)}, expected {_fmt(tshape)}")
        continue
    flat[path] = _from_torch(arr, path[-1], len(shape))
    matched.append(name)
  ignored, unexpected = [], []
  for name, arr in state_dict.items():
    if name in taken:
      continue
    if name.split(".")[-1] in _ALWAYS_IGNORED or name.startswith(spec.ignored_prefixes):
      ignored.append(name)
    else:
      unexpected.append(f"{name} {_fmt(np.shape(arr))}")
  if missing or unexpected or misshaped:
    lines = [f"{arch} weights from {source} do not fit the model "
             f"({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      lines += [f"  {title}: {item}" for item in items]
    raise ValueError("\n".join(lines))
  return _unflatten(flat), ImportReport(matched, squeezed, ignored)


def to_torch_state_dict(arch: str, variables: Mapping
                        ) -> "collections.OrderedDict[str, np.ndarray]":
  """The inverse of :func:`convert_state_dict`: Flax variables -> PyTorch-layout numpy arrays."""
  out = collections.OrderedDict()
  for path, v in _flatten({k: variables[k] for k in ("params", "batch_stats") if k in variables}
                          ).items():
    arr = np.asarray(v, np.float32)
    if path[-1] == "kernel" and arr.ndim == 4:
      arr = arr.transpose(3, 2, 0, 1)
    elif path[-1] == "kernel" and arr.ndim == 2:
      arr = arr.T
    out[torch_key(arch, path)] = np.ascontiguousarray(arr)
  return out


# ============================================================================= writing .pth

_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage"}


def _state_dict_pickle(state_dict: Mapping[str, np.ndarray]) -> bytes:
  """The protocol-2 pickle ``torch.save`` writes for ``OrderedDict(name -> contiguous tensor)``,
  storage ``i`` holding the ``i``-th tensor (opcode by opcode: only the globals the reader allows).
  """
  out = io.BytesIO()
  w = out.write

  def text(s):
    b = s.encode()
    w(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

  def integer(n):
    w(pickle.BININT + struct.pack("<i", int(n)))

  def glob(module, name):
    w(pickle.GLOBAL + f"{module}\n{name}\n".encode())

  def int_tuple(vals):
    w(pickle.MARK)
    for v in vals:
      integer(v)
    w(pickle.TUPLE)

  w(pickle.PROTO + b"\x02")
  glob("collections", "OrderedDict")
  w(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK)
  for idx, (name, arr) in enumerate(state_dict.items()):
    strides = [1] * arr.ndim
    for d in range(arr.ndim - 2, -1, -1):
      strides[d] = strides[d + 1] * arr.shape[d + 1]
    text(name)
    glob("torch._utils", "_rebuild_tensor_v2")
    w(pickle.MARK + pickle.MARK)  # the tensor's arguments, then the storage's persistent id
    text("storage")
    glob("torch", _STORAGE_NAMES[arr.dtype])
    text(str(idx))
    text("cpu")
    integer(arr.size)
    w(pickle.TUPLE + pickle.BINPERSID)
    integer(0)
    int_tuple(arr.shape)
    int_tuple(strides)
    w(pickle.NEWFALSE)
    glob("collections", "OrderedDict")
    w(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
  w(pickle.SETITEMS + pickle.STOP)
  return out.getvalue()


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes ``{name: array}`` as ``torch.save(state_dict, path)`` would (zip format), atomically.

  No torch needed; :func:`load_state_dict` (and ``torch.load``) read it back. Arrays are stored
  little-endian and contiguous; float32, float64, int32 and int64 only. The zip entries carry a
  fixed timestamp, so equal arrays give byte-identical files.
  """
  arrays = collections.OrderedDict()
  for name, a in state_dict.items():
    a = np.ascontiguousarray(a)
    if a.dtype not in _STORAGE_NAMES:
      raise ValueError(f"save_state_dict: {name} has dtype {a.dtype}; valid: "
                       f"{sorted(str(d) for d in _STORAGE_NAMES)}.")
    arrays[str(name)] = a
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp.pth")
  os.close(fd)

  def entry(zf, name, data):
    info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)

  try:
    with zipfile.ZipFile(tmp, "w") as zf:
      entry(zf, "data.pkl", _state_dict_pickle(arrays))
      entry(zf, "byteorder", "little")
      for idx, a in enumerate(arrays.values()):
        entry(zf, f"data/{idx}", a.astype(a.dtype.newbyteorder("<")).tobytes())
      entry(zf, "version", "3\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ============================================================================= import + cache


def default_cache_dir() -> str:
  """``$DMLJAX_WEIGHTS_CACHE``, else ``~/.cache/dmljax/weights``."""
  return os.environ.get("DMLJAX_WEIGHTS_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "dmljax", "weights")


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def cache_path(arch: str, path: str, cache_dir: Optional[str] = None) -> str:
  """Where the converted variables of ``path`` for ``arch`` are cached."""
  return os.path.join(cache_dir or default_cache_dir(), f"{arch}-{file_sha256(path)}.npz")


def save_converted(variables: Mapping, target: str) -> None:
  """Writes converted variables as ``.npz`` (flat ``collection/module/.../leaf`` keys), atomically.
  """
  os.makedirs(os.path.dirname(target), exist_ok=True)
  flat = {"/".join(k): np.asarray(v) for k, v in _flatten(variables).items()}
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp.npz")
  os.close(fd)
  try:
    np.savez(tmp, **flat)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is plain data
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_npz(target: str) -> dict:
  with np.load(target, allow_pickle=False) as z:
    return _unflatten({tuple(k.split("/")): np.asarray(z[k]) for k in z.files})


def import_torch_weights(arch: str, path: str, *, cache_dir: Optional[str] = None,
                         use_cache: bool = True, return_report: bool = False):
  """Variables of :func:`get_backbone` ``(arch)`` from a PyTorch ``.pth`` state dict.

  The first call converts the file and caches the result under ``cache_dir`` (see
  :func:`cache_path`); later calls with the same file (same SHA-256) load the cache.

  Args:
    arch: ``bn_inception`` | ``googlenet`` | ``resnet50`` | ``resnet_v2_20`` | ``small_cnn``.
    path: the ``torch.save(model.state_dict())`` file.
    cache_dir: cache folder (default :func:`default_cache_dir`).
    use_cache: read and write the cache (False: always convert, write nothing).
    return_report: also return the :class:`ImportReport` (None when loaded from the cache).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays (and the report).

  Raises:
    FileNotFoundError, UnsafeWeightFile, ValueError: see :func:`load_state_dict` and
      :func:`convert_state_dict`.
  """
  _check_arch(arch)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weight file {path!r} not found.")
  target = cache_path(arch, path, cache_dir) if use_cache else None
  if target is not None and os.path.isfile(target):
    try:
      variables = _load_npz(target)
      return (variables, None) if return_report else variables
    except (OSError, ValueError):  # a damaged cache entry: convert again
      pass
  variables, report = convert_state_dict(arch, load_state_dict(path), source=path)
  if target is not None:
    try:
      save_converted(variables, target)
    except OSError as e:
      import warnings  # pylint: disable=g-import-not-at-top
      warnings.warn(f"could not cache converted weights at {target}: {e}")
  return (variables, report) if return_report else variables


def load_pretrained(model_config, variables: Mapping) -> dict:
  """Puts imported trunk weights into an :class:`EmbeddingModel`'s variables.

  ``model_config.pretrained`` (``""``: nothing to do) is the weight file of
  ``model_config.name``; its converted params and batch statistics replace the ``backbone``
  subtrees, everything else (the embedding layer ``head``, ``head_bn``) keeps its init.

  Args:
    model_config: ``config.model``.
    variables: ``model.init(...)`` output, ``{"params": {"backbone", "head", ...},
      "batch_stats": {...}}``.

  Returns:
    A new variables dict (the input is not modified).

  Raises:
    FileNotFoundError: the file named by ``model.pretrained`` does not exist.
    ValueError: the backbone has no import, or the weights do not fit (all problems listed).
  """
  path = model_config.get("pretrained", "") or ""
  if not path:
    return variables
  name = model_config.name
  if name not in ARCHS:
    raise ValueError(f"model.pretrained={path!r} is set but model.name={name!r} has no weight "
                     f"import (importable: {sorted(ARCHS)}); set --config.model.pretrained=''.")
  if not os.path.isfile(path):
    hint = f" (usually {ARCHS[name].weight_file})" if ARCHS[name].weight_file else ""
    raise FileNotFoundError(
        f"model.pretrained: weight file {path!r} for {name} not found{hint}; set "
        "--config.model.pretrained to the .pth file, or '' to train from scratch.")
  try:
    imported = import_torch_weights(name, path)
  except ValueError as e:
    raise ValueError(f"model.pretrained={path!r}: {e}") from e
  out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in variables.items()}
  for coll in ("params", "batch_stats"):
    new = imported.get(coll, {})
    if not new:
      continue
    old = out.get(coll, {}).get("backbone")
    if old is None:
      raise ValueError(f"model.pretrained: the model's {coll} have no 'backbone' subtree.")
    old_flat, new_flat = _flatten(old), _flatten(new)
    bad = ["/".join(k) + (": not in the file" if k in old_flat else ": not in the model")
           for k in sorted(set(old_flat) ^ set(new_flat))]
    bad += [f"{'/'.join(k)}: model {tuple(old_flat[k].shape)}, file {tuple(new_flat[k].shape)}"
            for k in sorted(set(old_flat) & set(new_flat))
            if tuple(old_flat[k].shape) != tuple(new_flat[k].shape)]
    if bad:
      raise ValueError(f"model.pretrained={path!r}: imported {coll} do not fit the model's "
                       f"backbone: {bad[:20]}")
    out[coll]["backbone"] = jax.tree_util.tree_map(
        lambda o, n: jnp.asarray(n, jnp.asarray(o).dtype), old, new)
  return out
