"""The package's layers stay one-way (docs/design.md): the trainer names no method, nothing
below it imports it, and no module imports itself back through others."""
import ast
import os
import pathlib

import pytest

from helpers import REPO

PACKAGE = pathlib.Path(REPO) / "compmod_jax"
# Names that belong to particular methods (methods/adaptation.py, finetune/transfer.py; the trainer may name neither).
METHOD_WORDS = ("adversarial", "moment_matching", "best_source", "config.adaptation")


def module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path):
  """The compmod_jax modules `path` imports (from-imports of a package count as the package
  and each imported submodule that exists)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith("compmod_jax"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compmod_jax"):
      found.add(node.module)
      for alias in node.names:
        candidate = PACKAGE.parent / (node.module.replace(".", "/") + f"/{alias.name}.py")
        if candidate.exists():
          found.add(f"{node.module}.{alias.name}")
  return found


MODULES = {module_name(path): package_imports(path) for path in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("layer", ["models", "data", "methods", "analysis"])
def test_lower_layers_never_import_the_trainer(layer):
  offenders = {module: sorted(i for i in imports if i.startswith("compmod_jax.train"))
               for module, imports in MODULES.items()
               if module.startswith(f"compmod_jax.{layer}")}
  assert not any(offenders.values()), offenders


def test_the_trainer_names_no_method():
  for path in (PACKAGE / "train").glob("*.py"):
    text = path.read_text()
    assert not [word for word in METHOD_WORDS if word in text], path


def test_no_import_cycles():
  def visit(module, stack):
    if module in stack:
      raise AssertionError(" -> ".join(stack[stack.index(module):] + [module]))
    for imported in MODULES.get(module, ()):
      if imported != module and not module.startswith(imported + "."):  # a package's own init
        visit(imported, stack + [module])

  for module in MODULES:
    visit(module, [])


def test_no_file_refers_outside_the_repository():
  pattern_parts = ("../" + "shared", "DESIGN" + ".md")
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("workdirs", "build")]
    for name in files:
      if name.endswith((".py", ".md", ".sh", ".ini", ".cfg", ".txt")) or name == "run":
        text = pathlib.Path(root, name).read_text(errors="ignore")
        assert not any(part in text for part in pattern_parts), os.path.join(root, name)
