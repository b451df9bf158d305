"""The package's import arrows point down: models know no loss, frameworks no trainer module,
the library no command line, and the leaf modules import nothing of dmljax."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "dmljax"


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return {m for m in out if m.startswith("dmljax")}


# (files, modules they must not import)
RULES = [
    ("models/*.py", ("dmljax.losses", "dmljax.train", "dmljax.frameworks")),
    ("frameworks/*.py", ("dmljax.train", "dmljax.parallel", "dmljax.state", "dmljax.cli",
                         "dmljax.evaluation", "dmljax.rundir", "dmljax.checkpoint")),
    ("numerics.py", ("dmljax.",)),
    ("errors.py", ("dmljax.",)),
    ("train.py", ("dmljax.cli",)),
    ("evaluation.py", ("dmljax.train", "dmljax.cli")),
    ("rundir.py", ("dmljax.train", "dmljax.cli")),
    ("inputs.py", ("dmljax.train", "dmljax.cli")),
]


@pytest.mark.parametrize("pattern,banned", RULES, ids=[r[0] for r in RULES])
def test_import_arrows(pattern, banned):
  files = sorted(ROOT.glob(pattern))
  assert files, pattern
  bad = {f"{f.relative_to(ROOT)} imports {m}" for f in files for m in _imports(f)
         if any(m == b or m.startswith(b.rstrip(".") + ".") or (b.endswith(".") and m != "dmljax")
                for b in banned)}
  assert not bad, sorted(bad)
