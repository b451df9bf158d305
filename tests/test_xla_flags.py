"""dmljax's XLA CPU defaults (dmljax/xla_flags.py): added on import, never over a user's flag."""
import os
import subprocess
import sys
import textwrap

from dmljax import xla_flags

DEFAULT = xla_flags.CPU_DEFAULTS[0]


def test_defaults_join_the_users_flags_and_never_replace_one(monkeypatch):
  assert xla_flags.with_defaults("") == DEFAULT
  assert xla_flags.with_defaults("  ") == DEFAULT
  assert (xla_flags.with_defaults("--xla_force_host_platform_device_count=2")
          == "--xla_force_host_platform_device_count=2 " + DEFAULT)
  for own in ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_experimental_ynn_fusion_type=dot",
              "xla_cpu_experimental_ynn_fusion_type=+eltwise"):
    assert xla_flags.with_defaults(f"--a=1 {own}") == f"--a=1 {own}"
  # apply(): the environment, the switch, and nothing once JAX's backends run (this process's do).
  monkeypatch.setattr(xla_flags, "_backends_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--a=1")
  monkeypatch.setenv(xla_flags.ENV_SWITCH, "0")
  assert not xla_flags.apply() and os.environ["XLA_FLAGS"] == "--a=1"
  monkeypatch.delenv(xla_flags.ENV_SWITCH)
  assert xla_flags.apply() and os.environ["XLA_FLAGS"] == "--a=1 " + DEFAULT
  assert not xla_flags.apply()  # idempotent
  monkeypatch.undo()
  monkeypatch.setenv("XLA_FLAGS", "--a=1")
  assert not xla_flags._backends_started() or not xla_flags.apply()


def test_import_gives_convolutions_to_xla_and_keeps_dots_in_ynnpack():
  """In a fresh process, ``import dmljax.models`` sets the flag before JAX starts, XLA accepts it
  (a bad value would abort), a 3 x 3 convolution is then XLA's own kernel and a matrix product
  (the kNN's) still YNNPACK's; with DMLJAX_XLA_DEFAULTS=0 the convolution is YNNPACK's."""
  code = textwrap.dedent("""
      import os, re, sys
      import dmljax.models, jax, jax.numpy as jnp
      conv = lambda c, w: jax.lax.conv_general_dilated(c, w, (1, 1), "SAME",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      c = jax.jit(conv).lower(jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile()
      d = jax.jit(lambda a, b: a @ b.T).lower(jnp.ones((64, 32)), jnp.ones((64, 32))).compile()
      print(os.environ.get("XLA_FLAGS", ""), "|", "__ynn_fusion" in c.as_text(), "|",
            "__ynn_fusion" in d.as_text())
  """)
  out = {}
  for switch in ("1", "0"):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(DMLJAX_XLA_DEFAULTS=switch, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    out[switch] = [s.strip() for s in res.stdout.strip().splitlines()[-1].split("|")]
  assert out["1"] == [DEFAULT, "False", "True"], out
  assert out["0"] == ["", "True", "True"], out
