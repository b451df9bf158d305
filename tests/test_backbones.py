"""Backbones: PyTorch-exact pooling, weight import (with and without torch), BN freezing, bf16.

Without torch every import is still checked end to end: a small ``.pth`` writer (zip and legacy
formats, written opcode by opcode, no torch needed) stores random weights in PyTorch layout, and
the imported Flax model is compared with plain-numpy references of ResNet-v2-20 and of the full
BN-Inception at 227 x 227 (ceil-mode pools). With torch / torchvision / pretrainedmodels (the
``torch_ref`` extra) the imports are also compared with the real PyTorch modules at 224 and 227.
Each jitted backbone is compiled once per input shape for the whole module.
"""
import collections
import importlib
import importlib.util
import io
import os
import pickle
import struct
import zipfile
from typing import ClassVar

import flax.linen as nn
import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax import models
from dmljax.configs import base_config
from dmljax.models import import_weights, layers, torch_import


@pytest.fixture(autouse=True)
def _weights_cache(tmp_path, monkeypatch):
  """Every test gets its own weight cache (never ~/.cache)."""
  monkeypatch.setenv("DMLJAX_WEIGHTS_CACHE", str(tmp_path / "weights_cache"))


_APPLY = {}


def _features(arch, variables, x):
  """Inference features of ``get_backbone(arch)``; one jitted function per arch for the module."""
  if arch not in _APPLY:
    bb = models.get_backbone(arch)
    _APPLY[arch] = jax.jit(lambda v, x: bb.apply(v, x, train=False))
  return np.asarray(_APPLY[arch](variables, jnp.asarray(x)))


# ============================================================================= a .pth writer

_STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
            np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
            np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage"}


class Raw:
  """A tensor as PyTorch stores it: flat storage, element offset, size, element strides."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _raw(a):
  if isinstance(a, Raw):
    return a
  a = np.array(a, order="C")
  return Raw(a.reshape(-1), 0, a.shape, tuple(s // a.itemsize for s in a.strides))


def _main_pickle(entries, legacy, wrap_key=None):
  """Protocol-2 pickle of ``OrderedDict(name -> tensor)`` as torch writes it; returns bytes and
  the storages by key."""
  out, storages = io.BytesIO(), {}
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
  if wrap_key:
    w(pickle.EMPTY_DICT)
    text(wrap_key)
  glob("collections", "OrderedDict")
  w(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK)
  for idx, (name, value) in enumerate(entries.items()):
    r = _raw(value)
    key = str(idx)
    storages[key] = r.storage
    text(name)
    glob("torch._utils", "_rebuild_tensor_v2")
    w(pickle.MARK)
    w(pickle.MARK)  # the persistent id
    text("storage")
    glob("torch", _STORAGE[r.storage.dtype])
    text(key)
    text("cpu")
    integer(r.storage.size)
    if legacy:
      w(pickle.NONE)  # no view
    w(pickle.TUPLE + pickle.BINPERSID)
    integer(r.offset)
    int_tuple(r.size)
    int_tuple(r.stride)
    w(pickle.NEWFALSE)
    glob("collections", "OrderedDict")
    w(pickle.EMPTY_TUPLE + pickle.REDUCE)
    w(pickle.TUPLE + pickle.REDUCE)
  w(pickle.SETITEMS)
  if wrap_key:
    w(pickle.SETITEM)
  w(pickle.STOP)
  return out.getvalue(), storages


def write_pth(path, entries, legacy=False, wrap_key=None, pickle_bytes=None):
  """Writes ``entries`` (name -> array or :class:`Raw`) as ``torch.save`` would, without torch."""
  data, storages = _main_pickle(entries, legacy, wrap_key)
  if pickle_bytes is not None:
    data = pickle_bytes
  if not legacy:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
      zf.writestr("archive/data.pkl", data)
      zf.writestr("archive/byteorder", "little")
      for key, st in storages.items():
        zf.writestr(f"archive/data/{key}", st.astype(st.dtype.newbyteorder("<")).tobytes())
      zf.writestr("archive/version", "3\n")
    return path
  with open(path, "wb") as f:
    f.write(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2))
    f.write(pickle.dumps(1001, protocol=2))
    f.write(pickle.dumps({"protocol_version": 1001, "little_endian": True,
                          "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    f.write(data)
    keys = sorted(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for key in keys:
      st = storages[key]
      f.write(struct.pack("<q", st.size))
      f.write(st.astype(st.dtype.newbyteorder("<")).tobytes())
  return path


# ============================================================================= numpy references


def np_conv(x, w, b=None, stride=1, pad=0):
  """NCHW convolution with OIHW weights, symmetric zero padding (float64)."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  _, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((x.shape[0], o, oh, ow))
  for di in range(kh):
    for dj in range(kw):
      patch = x[:, :, di:di + stride * (oh - 1) + 1:stride, dj:dj + stride * (ow - 1) + 1:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, di, dj], optimize=True)
  return out if b is None else out + b[None, :, None, None]


def np_bn(x, sd, name, eps=1e-5):
  g, b = sd[name + ".weight"], sd[name + ".bias"]
  m, v = sd[name + ".running_mean"].reshape(-1), sd[name + ".running_var"].reshape(-1)
  g, b = g.reshape(-1), b.reshape(-1)
  return ((x - m[None, :, None, None]) / np.sqrt(v + eps)[None, :, None, None]
          * g[None, :, None, None] + b[None, :, None, None])


def np_out_size(n, k, s, p, ceil):
  o = (n + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
  if ceil and (o - 1) * s >= n + p:  # the last window must start inside input + left padding
    o -= 1
  return o


def np_pool(x, k, s, p, ceil, kind, count_include_pad=True):
  """PyTorch's MaxPool2d / AvgPool2d, window by window (NCHW, float64)."""
  _, _, h, w = x.shape
  oh, ow = np_out_size(h, k, s, p, ceil), np_out_size(w, k, s, p, ceil)
  out = np.zeros(x.shape[:2] + (oh, ow))
  for i in range(oh):
    hs = i * s - p
    he = min(hs + k, h + p)
    for j in range(ow):
      ws = j * s - p
      we = min(ws + k, w + p)
      win = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
      if kind == "max":
        out[:, :, i, j] = win.max(axis=(2, 3))
      else:
        div = (he - hs) * (we - ws) if count_include_pad else win.shape[2] * win.shape[3]
        out[:, :, i, j] = win.sum(axis=(2, 3)) / div
  return out


class RefNet:
  """Runs a reference forward pass, creating each PyTorch-layout weight the first time it is
  needed (random, with non-trivial BatchNorm statistics), so names and shapes come from here."""

  def __init__(self, seed, squeeze_bn=False):
    self.sd = collections.OrderedDict()
    self.rng = np.random.RandomState(seed)
    self.squeeze_bn = squeeze_bn

  def conv(self, x, name, out, k, stride=1, pad=0, bias=True):
    key = name + ".weight"
    if key not in self.sd:
      fan_in = x.shape[1] * k * k
      self.sd[key] = (self.rng.randn(out, x.shape[1], k, k) * np.sqrt(2.0 / fan_in)
                      ).astype(np.float32)
      if bias:
        self.sd[name + ".bias"] = (self.rng.randn(out) * 0.1).astype(np.float32)
    b = self.sd.get(name + ".bias") if bias else None
    return np_conv(x, self.sd[key].astype(np.float64), None if b is None else b.reshape(-1), stride,
                   pad)

  def bn(self, x, name, eps=1e-5):
    if name + ".weight" not in self.sd:
      c = x.shape[1]
      shape = (1, c) if self.squeeze_bn else (c,)  # BN-Inception files with [1, C] tensors
      r = self.rng
      self.sd[name + ".weight"] = r.uniform(0.5, 1.5, c).astype(np.float32).reshape(shape)
      self.sd[name + ".bias"] = (r.randn(c) * 0.2).astype(np.float32).reshape(shape)
      self.sd[name + ".running_mean"] = (r.randn(c) * 0.3).astype(np.float32).reshape(shape)
      self.sd[name + ".running_var"] = r.uniform(0.5, 2.0, c).astype(np.float32).reshape(shape)
      self.sd[name + ".num_batches_tracked"] = np.array(7, np.int64)
    return np_bn(x, {k: v.astype(np.float64) for k, v in self.sd.items()
                     if k.startswith(name + ".")}, name, eps)


def ref_resnet_v2_20(net, x):
  """Pre-activation ResNet-20 (16 / 32 / 64) in numpy, PyTorch names of dmljax's layout."""
  relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
  x = net.conv(x, "conv1", 16, 3, pad=1, bias=False)
  for si, width in enumerate((16, 32, 64), start=1):
    for bi in range(3):
      stride = 2 if si > 1 and bi == 0 else 1
      p = f"layer{si}.{bi}."
      pre = relu(net.bn(x, p + "bn1"))
      short = (net.conv(pre, p + "shortcut", width, 1, stride, bias=False)
               if stride != 1 or x.shape[1] != width else x)
      out = net.conv(pre, p + "conv1", width, 3, stride, 1, bias=False)
      out = net.conv(relu(net.bn(out, p + "bn2")), p + "conv2", width, 3, 1, 1, bias=False)
      x = out + short
  return relu(net.bn(x, "bn")).mean(axis=(2, 3))


# (tag, 1x1, 3x3 reduce, 3x3, double reduce, double, pool, pool proj, stride): Cadene's port.
_BNI = (("3a", 64, 64, 64, 64, 96, "avg", 32, 1), ("3b", 64, 64, 96, 64, 96, "avg", 64, 1),
        ("3c", 0, 128, 160, 64, 96, "max_s2", 0, 2), ("4a", 224, 64, 96, 96, 128, "avg", 128, 1),
        ("4b", 192, 96, 128, 96, 128, "avg", 128, 1),
        ("4c", 160, 128, 160, 128, 160, "avg", 128, 1),
        ("4d", 96, 128, 192, 160, 192, "avg", 128, 1),
        ("4e", 0, 128, 192, 192, 256, "max_s2", 0, 2),
        ("5a", 352, 192, 320, 160, 224, "avg", 128, 1),
        ("5b", 352, 192, 320, 192, 224, "max", 128, 1))


def ref_bn_inception(net, x):
  """Cadene's BN-Inception ``features`` + global average pool, in numpy."""
  def unit(a, name, out, k, s=1, p=0):
    return np.maximum(net.bn(net.conv(a, name, out, k, s, p), name + "_bn"), 0.0)
  x = unit(x, "conv1_7x7_s2", 64, 7, 2, 3)
  x = np_pool(x, 3, 2, 0, True, "max")
  x = unit(x, "conv2_3x3_reduce", 64, 1)
  x = unit(x, "conv2_3x3", 192, 3, 1, 1)
  x = np_pool(x, 3, 2, 0, True, "max")
  for tag, c1, r3, c3, rd, cd, pool, pp, st in _BNI:
    n = f"inception_{tag}_"
    outs = [unit(x, n + "1x1", c1, 1)] if c1 else []
    outs.append(unit(unit(x, n + "3x3_reduce", r3, 1), n + "3x3", c3, 3, st, 1))
    y = unit(unit(x, n + "double_3x3_reduce", rd, 1), n + "double_3x3_1", cd, 3, 1, 1)
    outs.append(unit(y, n + "double_3x3_2", cd, 3, st, 1))
    if pool == "max_s2":
      outs.append(np_pool(x, 3, 2, 0, True, "max"))
    else:
      outs.append(unit(np_pool(x, 3, 1, 1, True, pool), n + "pool_proj", pp, 1))
    x = np.concatenate(outs, axis=1)
  return x.mean(axis=(2, 3))


def _resnet_v2_20_file(tmp_path, in_channels=1, size=29, seed=0, name="rn20.pth"):
  net = RefNet(seed)
  x = np.random.RandomState(seed + 100).rand(2, in_channels, size, size)
  ref = ref_resnet_v2_20(net, x)
  return write_pth(str(tmp_path / name), net.sd), net.sd, x, ref


def _assert_features_close(out, ref):
  scale = float(np.abs(ref).max())
  assert scale > 0 and float(np.std(ref)) > 1e-3 * scale  # not a degenerate comparison
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * scale)


# ============================================================================= pooling


_POOL_CASES = [  # (size, window, stride, padding): odd sizes, windows overhanging with ceil mode
    (7, 3, 2, 0), (8, 3, 2, 0), (114, 3, 2, 0), (57, 3, 2, 1), (6, 2, 2, 0), (5, 2, 2, 1),
    (7, 3, 1, 1), (4, 3, 3, 1), (9, 3, 2, 1), (10, 4, 3, 2)]


def test_pool_output_size_follows_pytorch_rules():
  # ceil mode drops a last window that would start in the right padding: torch's own example.
  assert layers.pool_output_size(5, 2, 2, 1, ceil_mode=True) == 3
  assert layers.pool_output_size(6, 2, 2, 1, ceil_mode=True) == 4
  assert layers.pool_output_size(227, 7, 2, 3) == 114  # BN-Inception's stem conv geometry
  assert layers.pool_output_size(114, 3, 2, 0, ceil_mode=True) == 57
  assert layers.pool_output_size(114, 3, 2, 0, ceil_mode=False) == 56
  for n, k, s, p in _POOL_CASES:
    for ceil in (False, True):
      assert layers.pool_output_size(n, k, s, p, ceil) == np_out_size(n, k, s, p, ceil)
  with pytest.raises(ValueError, match="at most half"):
    layers.max_pool(jnp.zeros((1, 5, 5, 1)), 2, 2, 2)


def test_max_and_avg_pool_match_numpy_reference():
  rng = np.random.RandomState(0)
  for n, k, s, p in _POOL_CASES:
    x = rng.randn(1, 2, n, n + 1)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)
    for ceil in (False, True):
      got = np.asarray(layers.max_pool(xj, k, s, p, ceil)).transpose(0, 3, 1, 2)
      np.testing.assert_allclose(got, np_pool(x, k, s, p, ceil, "max"), rtol=1e-6, atol=1e-6)
      for cip in (True, False):
        got = np.asarray(layers.avg_pool(xj, k, s, p, ceil, cip)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, np_pool(x, k, s, p, ceil, "avg", cip), rtol=1e-5,
                                   atol=1e-6, err_msg=f"{(n, k, s, p, ceil, cip)}")


def test_pools_are_differentiable():
  x = jnp.asarray(np.random.RandomState(2).randn(1, 7, 6, 2), jnp.float32)
  jax.test_util.check_grads(lambda a: layers.max_pool(a, 3, 2, 1, ceil_mode=True), (x,), order=1,
                            modes=["rev"], atol=1e-2, rtol=1e-2)
  jax.test_util.check_grads(lambda a: layers.avg_pool(a, 3, 2, 1, ceil_mode=True), (x,), order=1,
                            modes=["rev"], atol=1e-2, rtol=1e-2)


def test_global_pool_heads():
  x = np.random.RandomState(1).rand(2, 3, 4, 5).astype(np.float32)
  xj = jnp.asarray(x)
  np.testing.assert_allclose(layers.global_pool(xj, "avg"), x.mean((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(layers.global_pool(xj, "max"), x.max((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(layers.global_pool(xj, "avg+max"), x.mean((1, 2)) + x.max((1, 2)),
                             rtol=1e-6)
  gem = np.mean(np.maximum(x, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
  np.testing.assert_allclose(layers.global_pool(xj, "gem", 3.0), gem, rtol=1e-5)
  np.testing.assert_allclose(layers.global_pool(xj, "gem", 1.0), x.mean((1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match="Unknown pooling 'sum'"):
    layers.global_pool(xj, "sum")


# ============================================================================= .pth reader


def test_pth_reader_zip_and_legacy(tmp_path):
  base = np.arange(24, dtype=np.float32)
  entries = collections.OrderedDict([
      ("w", np.random.RandomState(0).randn(4, 3, 2, 2).astype(np.float32)),
      ("transposed", Raw(base, 0, (3, 4), (1, 3))),       # a .t() view: non-contiguous
      ("offset", Raw(base, 5, (2, 3), (3, 1))),           # a slice of a larger storage
      ("count", np.array(3, np.int64)),
      ("half", np.array([1.5, -2.0], np.float16)),
      ("empty", np.zeros((0, 3), np.float32)),
  ])
  want = {"w": entries["w"], "transposed": base[:12].reshape(4, 3).T,
          "offset": base[5:11].reshape(2, 3), "count": np.array(3), "half": entries["half"],
          "empty": np.zeros((0, 3))}
  for legacy in (False, True):
    for wrap in (None, "state_dict"):
      path = write_pth(str(tmp_path / f"f{legacy}{wrap}.pth"), entries, legacy, wrap)
      sd = models.load_state_dict(path)
      assert list(sd) == list(want)
      for k, v in want.items():
        np.testing.assert_array_equal(sd[k], v)
        assert sd[k].shape == v.shape
      assert sd["count"].dtype == np.int64 and sd["half"].dtype == np.float16
  # A DataParallel state dict: the common "module." prefix is dropped.
  path = write_pth(str(tmp_path / "dp.pth"), {"module.a": base[:2], "module.b": base[:3]})
  assert list(models.load_state_dict(path)) == ["a", "b"]
  with pytest.raises(FileNotFoundError):
    models.load_state_dict(str(tmp_path / "nope.pth"))
  (tmp_path / "junk.pth").write_bytes(b"not a weight file at all")
  with pytest.raises(ValueError, match="neither a zip nor a legacy"):
    models.load_state_dict(str(tmp_path / "junk.pth"))


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_reader_refuses_forbidden_globals(tmp_path):
  marker = tmp_path / "pwned"
  evil = pickle.dumps(collections.OrderedDict(a=_Evil(marker)), protocol=2)
  for legacy in (False, True):
    path = write_pth(str(tmp_path / f"evil{legacy}.pth"), {"a": np.zeros(2, np.float32)},
                     legacy=legacy, pickle_bytes=evil)
    with pytest.raises(models.UnsafeWeightFile, match=r"refusing to load global \w+\.system"):
      models.load_state_dict(path)
    with pytest.raises(ValueError, match="refusing"):  # an UnsafeWeightFile is a ValueError
      models.import_torch_weights("resnet_v2_20", path)
  assert not marker.exists()
  # A whole pickled module (not a state dict) is refused with a hint.
  bad = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch.nn.modules.conv\nConv2d\n" +
         pickle.STOP)
  path = write_pth(str(tmp_path / "module.pth"), {}, pickle_bytes=bad)
  with pytest.raises(models.UnsafeWeightFile, match="state_dict"):
    models.load_state_dict(path)


# ============================================================================= imports vs numpy


def test_resnet_v2_20_import_matches_numpy_and_is_cached(tmp_path, monkeypatch):
  path, sd, x, ref = _resnet_v2_20_file(tmp_path)
  variables, report = models.import_torch_weights("resnet_v2_20", path, return_report=True)
  assert len(report.matched) == sum(not k.endswith("num_batches_tracked") for k in sd)
  assert all(k.endswith("num_batches_tracked") for k in report.ignored)
  out = _features("resnet_v2_20", variables, x.transpose(0, 2, 3, 1).astype(np.float32))
  assert out.shape == (2, 64)
  _assert_features_close(out, ref)
  # The converted variables are cached under the file's SHA-256 and loaded from there next time.
  cached = torch_import.cache_path("resnet_v2_20", path)
  assert os.path.isfile(cached) and torch_import.file_sha256(path) in os.path.basename(cached)

  def no_reading(_):
    raise AssertionError("the .pth file was read again")
  monkeypatch.setattr(torch_import, "load_state_dict", no_reading)
  again = models.import_torch_weights("resnet_v2_20", path)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_bn_inception_import_matches_numpy_at_227(tmp_path):
  """The full BN-Inception at the protocol's 227 x 227 (where ceil-mode pooling changes every
  map size), legacy-format file with [1, C] BatchNorm tensors, no torch."""
  net = RefNet(3, squeeze_bn=True)
  x = np.random.RandomState(4).randn(1, 3, 227, 227)
  ref = ref_bn_inception(net, x)
  path = write_pth(str(tmp_path / "bn_inception.pth"), net.sd, legacy=True)
  variables, report = models.import_torch_weights("bn_inception", path, return_report=True)
  assert report.squeezed and all(".running_" in k or k.endswith((".weight", ".bias"))
                                 for k in report.squeezed)
  out = _features("bn_inception", variables, x.transpose(0, 2, 3, 1).astype(np.float32))
  assert out.shape == (1, 1024)
  _assert_features_close(out, ref)


def test_mismatched_weight_file_lists_every_problem(tmp_path, capsys):
  path, orig, _, _ = _resnet_v2_20_file(tmp_path, in_channels=3, size=8)
  sd = collections.OrderedDict(orig)
  del sd["layer1.0.conv1.weight"]
  sd["extra.weight"] = np.zeros((3,), np.float32)
  sd["layer2.0.shortcut.weight"] = np.zeros((32, 16, 3, 3), np.float32)
  sd["bn.running_var"] = np.ones((2, 32), np.float32)  # same size, not a [1, C] squeeze
  bad = write_pth(str(tmp_path / "bad.pth"), sd)
  with pytest.raises(ValueError) as e:
    models.import_torch_weights("resnet_v2_20", bad)
  msg = str(e.value)
  assert "1 missing, 1 unexpected, 2 mis-shaped" in msg
  assert "missing: layer1.0.conv1.weight [16, 16, 3, 3]" in msg
  assert "unexpected: extra.weight [3]" in msg
  assert "mis-shaped: layer2.0.shortcut.weight: file [32, 16, 3, 3], expected [32, 16, 1, 1]" \
      in msg
  assert "mis-shaped: bn.running_var: file [2, 32], expected [64]" in msg
  cache = tmp_path / "weights_cache"
  assert not cache.exists() or not os.listdir(cache)  # nothing cached for a bad file
  # The command line: one line, exit status 2; --verbose gives the list; a good file is
  # converted and cached.
  assert import_weights.main(["resnet_v2_20", bad]) == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("python -m dmljax.models.import_weights: error: resnet_v2_20 weights "
                           "from") and "--verbose lists the 4 tensors" in err[0]
  assert len(err) == 2 and "--verbose" in err[1]
  assert import_weights.main(["resnet_v2_20", bad, "--verbose"]) == 2
  assert "extra.weight" in capsys.readouterr().err
  truncated = str(tmp_path / "truncated.pth")
  with open(path, "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[:200])
  assert import_weights.main(["resnet_v2_20", truncated]) == 2
  assert "truncated" in capsys.readouterr().err.splitlines()[0]
  assert import_weights.main(["resnet_v2_20", path, "--cache-dir", str(tmp_path / "c")]) == 0
  printed = capsys.readouterr().out
  n_bn = sum(k.endswith("num_batches_tracked") for k in orig)
  assert f"matched {len(orig) - n_bn} of {len(orig)} tensors" in printed
  assert f"ignored {n_bn} BatchNorm num_batches_tracked counters" in printed
  assert os.path.isfile(torch_import.cache_path("resnet_v2_20", path, str(tmp_path / "c")))


# ============================================================================= model options


def _mc(**kw):
  mc = base_config().model
  mc.name = "resnet_v2_20"
  mc.embedding_dim = 8
  mc.normalization = "none"
  for k, v in kw.items():
    mc[k] = v
  return mc


def _init(model, x, seed=0):
  """Random variables of ``model`` without ``model.init``: this CPU's XLA takes ~1 s to compile
  each random-normal initialiser, so shapes come from ``eval_shape`` and values from numpy."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.RandomState(seed)

  def fill(path, s):
    leaf = str(path[-1].key)
    if leaf == "kernel":
      v = rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif leaf in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, s.shape)
    else:  # bias, mean
      v = rng.randn(*s.shape) * 0.1
    return jnp.asarray(v, jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _leaves_named(tree, leaf):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [v for p, v in flat if str(getattr(p[-1], "key", "")) == leaf]


@pytest.mark.parametrize("mode", ["none", "stats", "stats_and_affine"])
def test_freeze_bn(mode):
  model = models.get_model(_mc(freeze_bn=mode))
  x = jax.random.uniform(jax.random.PRNGKey(0), (256,)).reshape(4, 8, 8, 1)
  v = _init(model, x)

  @jax.jit
  def step(params, bs):
    def loss(params):
      out, mut = model.apply({"params": params, "batch_stats": bs}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.sum(out ** 2), (out, mut["batch_stats"])
    grads, (out, new_bs) = jax.grad(loss, has_aux=True)(params)
    new_params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
    return grads, out, new_bs, new_params

  grads, out_train, new_bs, new_params = step(v["params"], v["batch_stats"])
  changed = [bool(np.any(np.asarray(a) != np.asarray(b)))
             for a, b in zip(jax.tree.leaves(v["batch_stats"]), jax.tree.leaves(new_bs))]
  assert all(float(jnp.abs(g).max()) > 0 for g in _leaves_named(grads["backbone"], "kernel"))
  if mode == "none":
    assert all(changed)
    return
  assert not any(changed)  # running statistics fixed in train mode
  # Train mode is inference mode for the trunk: the output is the train=False one.
  np.testing.assert_allclose(out_train, jax.jit(lambda v: model.apply(v, x, train=False))(v),
                             rtol=1e-5, atol=1e-6)
  scale_g = _leaves_named(grads["backbone"], "scale")
  affine_g = scale_g + [g for g in _leaves_named(grads["backbone"], "bias")]
  if mode == "stats":
    assert all(float(jnp.abs(g).max()) > 0 for g in scale_g)
  else:
    assert all(float(jnp.abs(g).max()) == 0 for g in affine_g)
  # After a gradient step, a train-mode pass still leaves the statistics as they were.
  _, _, bs2, _ = step(new_params, new_bs)
  jax.tree.map(np.testing.assert_array_equal, bs2, v["batch_stats"])


def test_bfloat16_matches_float32():
  m32 = models.get_model(_mc())
  m16 = models.get_model(_mc(dtype="bfloat16"))
  x = jax.random.uniform(jax.random.PRNGKey(0), (1536,)).reshape(2, 16, 16, 3)
  v = _init(m32, x)
  shapes16 = jax.eval_shape(lambda: m16.init(jax.random.PRNGKey(1), x, train=False))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes16))  # params, stats f32
  assert jax.tree.structure(shapes16) == jax.tree.structure(v)
  out32 = jax.jit(lambda v: m32.apply(v, x, train=False))(v)
  f16 = jax.jit(lambda v: m16.apply(v, x, train=True, mutable=["batch_stats"]))
  out16_train, mut = f16(v)
  assert out16_train.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(mut))
  out16 = jax.jit(lambda v: m16.apply(v, x, train=False))(v)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < 3e-2, rel  # bf16 keeps 8 mantissa bits: ~1e-2 after 20 layers
  jaxpr = str(jax.make_jaxpr(lambda v: m16.apply(v, x, train=False))(v))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr


def test_remat_same_outputs_and_grads():
  x = jax.random.uniform(jax.random.PRNGKey(0), (128,)).reshape(2, 8, 8, 1)
  plain, remat = models.get_model(_mc()), models.get_model(_mc(remat=True))
  v = _init(plain, x)

  def grad_fn(model):
    def loss(params):
      out, _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out ** 2)
    return jax.grad(loss)

  g1, g2 = jax.jit(grad_fn(plain))(v["params"]), jax.jit(grad_fn(remat))(v["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
  jaxpr = str(jax.make_jaxpr(grad_fn(remat))(v["params"]))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


class _Probe(nn.Module):
  """Backbone stand-in recording its input pixels."""
  preprocessing: ClassVar = layers.CAFFE_BGR

  @nn.compact
  def __call__(self, x, train=False):
    self.sow("intermediates", "pixels", x)
    return jnp.mean(x, axis=(1, 2, 3))[:, None]


def test_uint8_images_get_the_backbones_preprocessing():
  img = np.random.RandomState(0).randint(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  model = models.EmbeddingModel(backbone=_Probe(), embedding_dim=2, normalization="none")
  v = _init(model, img)

  def pixels(images):
    _, st = model.apply(v, images, train=False, mutable=["intermediates"])
    return np.asarray(st["intermediates"]["backbone"]["pixels"][0])

  bgr = img[..., ::-1].astype(np.float64) - np.array([104.0, 117.0, 128.0])
  np.testing.assert_allclose(pixels(img), bgr, rtol=1e-6)
  gray = img[..., :1]
  np.testing.assert_allclose(pixels(gray), gray / 255.0, rtol=1e-6)  # 1 channel: x / 255
  floats = img.astype(np.float32) / 7.0
  np.testing.assert_allclose(pixels(floats), floats, rtol=1e-6)     # floats: as given
  rgb = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(np.asarray(layers.IMAGENET_RGB.normalize(img)), rgb, rtol=1e-5,
                             atol=1e-5)
  for name in ("bn_inception", "googlenet", "resnet50"):
    assert models.BACKBONE_CLASSES[name].preprocessing is not None
  assert models.BACKBONE_CLASSES["resnet_v2_20"].preprocessing is None


def test_param_layout_and_load_pretrained(tmp_path):
  path, sd, _, _ = _resnet_v2_20_file(tmp_path, in_channels=1, size=8)
  mc = _mc(embedding_bn=True, pretrained=path)
  model = models.get_model(mc)
  x = jnp.zeros((1, 8, 8, 1), jnp.uint8)
  v = _init(model, x)
  before = jax.tree.map(np.array, v)
  assert set(v["params"]) == {"backbone", "head", "head_bn"}
  assert set(v["params"]["head"]) == {"kernel", "bias"}
  assert set(v["batch_stats"]) == {"backbone", "head_bn"}
  new = models.load_pretrained(mc, v)
  want = models.import_torch_weights("resnet_v2_20", path)
  jax.tree.map(np.testing.assert_array_equal, new["params"]["backbone"], want["params"])
  jax.tree.map(np.testing.assert_array_equal, new["batch_stats"]["backbone"],
               want["batch_stats"])
  for k in ("head", "head_bn"):
    jax.tree.map(np.testing.assert_array_equal, new["params"][k], v["params"][k])
  jax.tree.map(np.testing.assert_array_equal, v, before)  # the input is left as it was
  assert models.load_pretrained(_mc(pretrained=""), v) is v
  with pytest.raises(FileNotFoundError, match="model.pretrained"):
    models.load_pretrained(_mc(pretrained=str(tmp_path / "missing.pth")), v)
  with pytest.raises(ValueError, match="model.pretrained"):
    models.load_pretrained(_mc(name="small_cnn", pretrained=path), v)
  # Weights of a 3-channel network do not fit a 1-channel model: named, before training.
  path3, _, _, _ = _resnet_v2_20_file(tmp_path, in_channels=3, size=8, name="rn20_rgb.pth")
  with pytest.raises(ValueError, match="model.pretrained.*conv1"):
    models.load_pretrained(_mc(pretrained=path3), v)


def test_option_validation():
  for key, value in (("pooling", "sum"), ("freeze_bn", "all"), ("dtype", "float16")):
    with pytest.raises(ValueError, match=f"Unknown {key} '{value}'.*model.{key}"):
      models.get_model(_mc(**{key: value}))
  with pytest.raises(ValueError, match="No PyTorch weight import for 'vit_b16'"):
    models.import_torch_weights("vit_b16", __file__)


# ============================================================================= vs PyTorch


def _optional(name, why):
  """Imports ``name`` or skips the test (absent, or installed but broken, e.g. a torchvision
  built for another torch)."""
  try:
    return importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"{why} ({type(e).__name__}: {e})")


def _torch():
  return _optional("torch", "PyTorch reference tests need torch (torch_ref extra)")


def _randomise_bn(torch, module, seed):
  """Non-trivial BatchNorm: random running mean, running var in [0.5, 2], random affine."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
  return module.eval()


def _bninception_class():
  """pretrainedmodels' BNInception; its module file alone if the package import fails."""
  try:
    return importlib.import_module("pretrainedmodels.models.bninception").BNInception
  except Exception:  # pylint: disable=broad-except  (e.g. its package pulls a broken import)
    spec = importlib.util.find_spec("pretrainedmodels")
    if spec is None or not spec.submodule_search_locations:
      pytest.skip("BN-Inception reference needs pretrainedmodels (torch_ref extra)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "bninception.py")
    if not os.path.isfile(path):
      pytest.skip("BN-Inception reference needs pretrainedmodels (torch_ref extra)")
    mod_spec = importlib.util.spec_from_file_location("_bninception_ref", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.BNInception


def test_pooling_and_reference_match_torch():
  torch = _torch()
  F = torch.nn.functional
  rng = np.random.RandomState(5)
  for n, k, s, p in _POOL_CASES[:7]:
    x = rng.randn(1, 2, n, n + 2).astype(np.float32)
    xt, xj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))
    for ceil in (False, True):
      want = F.max_pool2d(xt, k, s, p, ceil_mode=ceil).numpy()
      np.testing.assert_allclose(np_pool(x, k, s, p, ceil, "max"), want, rtol=1e-6)
      got = np.asarray(layers.max_pool(xj, k, s, p, ceil)).transpose(0, 3, 1, 2)
      np.testing.assert_array_equal(got, want)
      for cip in (True, False):
        want = F.avg_pool2d(xt, k, s, p, ceil_mode=ceil, count_include_pad=cip).numpy()
        np.testing.assert_allclose(np_pool(x, k, s, p, ceil, "avg", cip), want, rtol=1e-5,
                                   atol=1e-6)
        got = np.asarray(layers.avg_pool(xj, k, s, p, ceil, cip)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Gradients: the same as PyTorch's backward (ceil mode, overhanging windows).
  x = rng.randn(1, 2, 9, 8).astype(np.float32)
  for pool_t, pool_j in ((lambda a: F.max_pool2d(a, 3, 2, 1, ceil_mode=True),
                          lambda a: layers.max_pool(a, 3, 2, 1, ceil_mode=True)),
                         (lambda a: F.avg_pool2d(a, 3, 2, 1, ceil_mode=True),
                          lambda a: layers.avg_pool(a, 3, 2, 1, ceil_mode=True))):
    xt = torch.from_numpy(x).requires_grad_()
    out = pool_t(xt)
    g = rng.randn(*out.shape).astype(np.float32)
    (out * torch.from_numpy(g)).sum().backward()
    gj = jax.grad(lambda a: jnp.sum(pool_j(a) * g.transpose(0, 2, 3, 1)))(
        jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(gj).transpose(0, 3, 1, 2), xt.grad.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_reader_and_writer_agree_with_torch(tmp_path):
  torch = _torch()
  base = torch.arange(20, dtype=torch.float32)
  sd = collections.OrderedDict(
      a=torch.randn(3, 4).t(), view=base[5:11].view(2, 3), base=base,
      n=torch.tensor(4, dtype=torch.int64), h=torch.tensor([0.5], dtype=torch.float16),
      b=torch.tensor([1.25, -3.0], dtype=torch.bfloat16))
  for legacy in (False, True):
    path = str(tmp_path / f"t{legacy}.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = models.load_state_dict(path)
    assert list(got) == list(sd)
    for k, v in sd.items():
      np.testing.assert_array_equal(got[k].astype(np.float64), v.double().numpy())
  # Files of the test's own writer load in torch (with its own restricted loader).
  entries = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
             "t": Raw(np.arange(12, dtype=np.float32), 2, (2, 3), (1, 4))}
  for legacy in (False, True):
    path = write_pth(str(tmp_path / f"w{legacy}.pth"), entries, legacy)
    loaded = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(loaded["w"].numpy(), entries["w"])
    np.testing.assert_array_equal(loaded["t"].numpy(), np.arange(12.0)[2:][[[0, 4, 8],
                                                                            [1, 5, 9]]])


def _torch_model(torch, arch):
  if arch == "resnet50":
    tv = _optional("torchvision", "the ResNet-50 reference needs torchvision (torch_ref extra)")
    return tv.models.resnet50(weights=None), "fc"
  if arch == "googlenet":
    tv = _optional("torchvision", "the GoogLeNet reference needs torchvision (torch_ref extra)")
    # With the auxiliary heads, as torchvision's weight file has them (they are ignored).
    return tv.models.googlenet(weights=None, aux_logits=True, init_weights=True), "fc"
  return _bninception_class()(), "last_linear"


@pytest.mark.parametrize("arch", ["bn_inception", "googlenet", "resnet50"])
def test_import_matches_torch(arch, tmp_path):
  torch = _torch()
  torch.manual_seed(0)
  tm, classifier = _torch_model(torch, arch)
  _randomise_bn(torch, tm, seed=1)
  sd = tm.state_dict()
  legacy = arch == "bn_inception"  # the real BN-Inception file predates the zip format
  if arch == "bn_inception":  # and stores some BatchNorm tensors as [1, C]
    sd = collections.OrderedDict((k, v[None] if "_bn." in k and k.endswith(("weight", "var"))
                                  else v) for k, v in sd.items())
  path = str(tmp_path / f"{arch}.pth")
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
  variables = models.import_torch_weights(arch, path)
  setattr(tm, classifier, torch.nn.Identity())
  tm.eval()
  for size in (224, 227):
    x = np.random.RandomState(size).randn(1, 3, size, size).astype(np.float32)
    with torch.no_grad():
      ref = tm(torch.from_numpy(x)).numpy()
    out = _features(arch, variables, x.transpose(0, 2, 3, 1))
    assert out.shape == ref.shape == (1, models.BACKBONE_CLASSES[arch].feature_dim)
    _assert_features_close(out, ref)
