"""The documentation: every snippet in README.md and docs/ runs as pasted, or is marked with the
reason it cannot run here. (The site itself is built with warnings as errors by ``.ci/run``:
``python -m sphinx -W -b html docs OUT``.)

A fenced ``python`` or ``bash`` block runs unless the line just above it is
``<!-- snippet: skip (REASON) -->`` (it needs data, weights, an accelerator, or trains for
minutes). The python blocks of one page run in order in one fresh interpreter, as a reader
pasting them would; each bash block runs on its own from the repository root.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md")
                                      if "_build" not in p.parts)
FENCE = re.compile(r"(?:<!-- snippet: (?P<marker>[^\n]*?) -->\n)?"
                   r"^```(?P<lang>[\w{}-]*)[^\n]*\n(?P<body>.*?)^```", re.S | re.M)
SKIP = re.compile(r"^skip \((?P<reason>.+)\)$")


def _blocks(page):
  """``[(lang, body, skip_reason or None)]`` of a page's python and bash blocks."""
  out = []
  for m in FENCE.finditer(page.read_text()):
    if m["lang"] not in ("python", "bash"):
      continue
    reason = None
    if m["marker"] is not None:
      s = SKIP.match(m["marker"].strip())
      assert s, f"{page.name}: bad snippet marker {m['marker']!r}; use 'skip (REASON)'"
      reason = s["reason"]
    out.append((m["lang"], m["body"], reason))
  return out


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # the suite's 8 fake devices are not what a reader has
  return env


RUNNABLE = [p for p in PAGES if any(r is None for _, _, r in _blocks(p))]


def test_every_snippet_is_run_or_says_why_not():
  for page in PAGES:
    for lang, body, reason in _blocks(page):
      assert reason is None or len(reason) > 5, (page, body)


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_snippets_run_as_pasted(page, tmp_path):
  blocks = [(lang, body) for lang, body, reason in _blocks(page) if reason is None]
  python = "\n".join(body for lang, body in blocks if lang == "python")
  if python:
    r = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{page.name}: python snippets failed:\n{r.stdout}\n{r.stderr}"
  for lang, body in blocks:
    if lang == "bash":
      r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600, check=False)
      assert r.returncode == 0, f"{page.name}: `{body.strip()}` failed:\n{r.stdout}\n{r.stderr}"
