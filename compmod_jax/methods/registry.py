"""Methods are plug-ins: what a run minimises, looked up by `config.method`.

The trainer (compmod_jax/train) knows no method by name. It asks the method named by
config.method for:

  make_loss(config, spec)   -> loss(model, params, batch_stats, batch, rng)
                               -> (loss, (new batch_stats, {metric name: scalar}))
                               `batch` is {task: {"image", "label", "mask"}}, every task of the
                               run in every step.
  own_params                the key of the method's own variables in params ("" = none); they
                               form one optimizer group of that name (regex "^<own_params>/"),
                               trained by config.optimizer.lr_multipliers.<own_params> (default
                               1) and left alone by the config.trainable presets.
  init_params(config, model, variables, rng, example_images)
                            -> the method's own initial params (with own_params).
  trained_tasks(config)     -> the tasks whose private rows (xi, head, per-task BN) may train;
                               the other tasks' rows stay bit-identical.
  results(config, task_results)
                            -> extra top-level fields of results.json ({} = none).
  check_config(config)      raises ValueError for the method's own config fields; part of the
                               one validation pass (compmod_jax/train/validation.py).

A new method is a `Method` passed to `register`, from any module; see tests/test_methods.py for
one defined in a test file and trained end to end.
"""
import dataclasses
import importlib
from typing import Callable, Optional

# Modules whose import registers the methods that ship with the package.
BUILTIN_METHOD_MODULES = ("compmod_jax.methods.supervised", "compmod_jax.methods.adaptation")

_METHODS = {}


def all_tasks(config):
  return tuple(sorted(config.tasks))


def no_results(config, task_results):
  del config, task_results
  return {}


def no_checks(config):
  del config


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  make_loss: Callable
  own_params: str = ""
  init_params: Optional[Callable] = None
  trained_tasks: Callable = all_tasks
  results: Callable = no_results
  check_config: Callable = no_checks
  # (config, variable path) -> the tasks whose rows of that variable may train, when a method
  # trains some tasks' rows of some variables only; None: trained_tasks(config) for all.
  trained_rows: Optional[Callable] = None

  def rows_trained(self, config, path):
    """The tasks whose rows of the per-task variable at `path` ("mixture_logits",
    "block_bn/expand/scale", ...) this method may train."""
    if self.trained_rows is None:
      return self.trained_tasks(config)
    return self.trained_rows(config, path)

  def __post_init__(self):
    if bool(self.own_params) != (self.init_params is not None):
      raise ValueError(f"Method {self.name!r}: own_params and init_params go together (a method "
                       f"with its own variables says where they live and how they start).")


def register(method):
  """Adds `method` under its name (a second method of that name replaces the first, so a
  module reloaded in a notebook does not fail); returns it."""
  _METHODS[method.name] = method
  return method


def get(name):
  """The method registered as `name`; a ValueError lists the registered ones."""
  _import_builtins()
  if name not in _METHODS:
    raise ValueError(f"config.method must be one of {names()}, got {name!r}")
  return _METHODS[name]


def names():
  _import_builtins()
  return tuple(sorted(_METHODS))


def _import_builtins():
  for module in BUILTIN_METHOD_MODULES:
    importlib.import_module(module)
