"""The package's layers stay one-way (docs/design.md): the trainer names no method; the
layers below the trainer reach nothing of it, of the fine-tuning package or of the commands,
directly or through other modules; and no module imports itself back through others."""
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


# The modules users run with `python -m` (and the layer they share): they may reach anything.
COMMANDS = {"compmod_jax.main", "compmod_jax.plan", "compmod_jax.surgery", "compmod_jax.cli",
            "compmod_jax.analysis.perturb", "compmod_jax.analysis.tables"}


def reached(module):
  """Every compmod_jax module `module` imports, directly or through others."""
  seen, todo = set(), [module]
  while todo:
    for imported in MODULES.get(todo.pop(), ()):
      if imported not in seen:
        seen.add(imported)
        todo.append(imported)
  return seen


def is_above(module, layers):
  return module in COMMANDS or any(module == f"compmod_jax.{layer}"
                                   or module.startswith(f"compmod_jax.{layer}.")
                                   for layer in layers)


@pytest.mark.parametrize("layer, above", [
    ("models", ("train", "finetune", "data", "methods", "analysis")),
    ("data", ("train", "finetune", "models", "methods", "analysis")),
    ("methods", ("train", "finetune")),
    ("analysis", ("train", "finetune")),
    ("train", ()),
    ("finetune", ()),
])
def test_no_layer_reaches_what_is_above_it(layer, above):
  """Transitively: a module that imports a helper that imports the trainer reaches it too."""
  offenders = {module: sorted(m for m in reached(module) if is_above(m, above))
               for module in MODULES
               if module.startswith(f"compmod_jax.{layer}") and module not in COMMANDS}
  assert not any(offenders.values()), offenders


def test_the_reach_is_transitive():
  """The check itself: the trainer reaches models through the model spec's users."""
  assert "compmod_jax.models.templates" in reached("compmod_jax.train.loop")
  assert not {"compmod_jax.models.templates"} & MODULES["compmod_jax.train.loop"]


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
