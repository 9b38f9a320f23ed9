"""What fixes the network's shape and computation: `NetworkSpec`, built from `config.model`,
whose fields' defaults are `config.model`'s defaults and whose check is the only check of
them (train/validation.py calls it before any data is read)."""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from compmod_jax import ranges
from compmod_jax.models import ops, templates
from compmod_jax.ranges import INF

DESIGNS = {"small": (128, 256), "large": (960, 1280)}  # output adapter (c1, c2), App. A.1
BATCH_NORM_MODES = ("per_layer", "per_task", "mixed")
# "per_task" gives every task its own input adapter: the plain network's domain adaptation
# baseline tunes the target's adapter alone (paper §4.4), while the sources keep theirs.
INPUT_ADAPTER_MODES = ("shared", "per_task")
# How a layer picks its mixture of templates (config.model.routing): "task" by the task's xi
# alone (the paper); "example" adds a router on the layer's pooled input to those logits, so
# every example gets its own xi; "task_posterior" infers the task in evaluation and mixes the
# tasks' xi by its posterior (docs/model.md, "Routing by content").
ROUTINGS = ("task", "example", "task_posterior")
LAYER_ITERATIONS = ("auto", "loop", "scan")
# The dtype of activations and of the convolutions' inputs and kernels
# (config.model.compute_dtype). Parameters, optimizer state, EMA, BN statistics, the softmax of
# xi and the mixing of the templates stay float32 (the mixed kernels are cast after mixing), and
# so do the logits, the features the methods read, losses and metrics: bfloat16 halves the
# activation bytes a step keeps and moves, without the small template gradients and xi updates
# losing their precision.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Rematerialisation of each layer for the backward pass (config.model.remat): "none" keeps every
# intermediate activation; "full" keeps only each layer's input and recomputes the rest of the
# layer; "dots" also keeps the outputs of its matmuls and convolutions (the 1x1 expand and
# project, and the native depthwise convolution), recomputing only the elementwise work.
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_saveable}
# Below this depth a Python loop over layers compiles quickly enough and gives the faster CPU
# step; deeper models use lax.scan so that compile time stays nearly flat (benchmarks/depth.py).
AUTO_SCAN_MIN_LAYERS = 24
# The one logits layer of a task_free model, which every task's images go through.
TASK_FREE_HEAD = "all_tasks"


def round_channels(channels, divisor=8):
  """MobileNet rounding: nearest multiple of `divisor`, never more than 10% below."""
  rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * channels else rounded


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """Everything that fixes the network's shape and computation. Validated on creation."""
  tasks: tuple  # ((name, num_classes), ...)
  input_channels: int
  num_layers: int = 16
  num_templates: int = 4
  depth_multiplier: float = 0.6
  design: str = "small"
  expansion: int = 6
  use_se: bool = True
  se_ratio: float = 0.25
  patch_size: int = 2
  activation: str = "relu"
  dropout_rate: float = 0.2
  signature: str = "mixture"
  explicit_signature: tuple = ()
  signature_seed: int = 0
  mixture_init: str = "normal"
  mixture_init_scale: float = 1.0
  shared_mixture_layers: int = 0
  routing: str = "task"
  task_free: bool = False
  batch_norm: str = "per_layer"
  input_adapter: str = "shared"
  input_skip: bool = False
  layer_iteration: str = "auto"
  scan_unroll: int = 1
  conv_impl: str = "auto"
  # How the step computes, not what it learns: neither is part of a checkpoint's identity, so a
  # run resumes or fine-tunes under other values (COMPUTE_DTYPES, REMAT_POLICIES).
  compute_dtype: str = "float32"
  remat: str = "none"
  bn_momentum: float = 0.99
  bn_eps: float = 1e-3

  def __post_init__(self):
    _validate(self)

  @classmethod
  def from_config(cls, model_config, tasks, input_channels):
    """Builds the spec from `config.model`; an unknown key is an error naming it."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"tasks", "input_channels"}
    values = dict(model_config)
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"Unknown config.model field(s) {unknown}; valid: {sorted(fields)}")
    values["explicit_signature"] = parse_explicit_signature(values.get("explicit_signature", ()))
    return cls(tasks=tuple((str(n), int(c)) for n, c in tasks), input_channels=input_channels,
               **values)

  @property
  def width(self):
    return round_channels(40 * self.depth_multiplier)

  @property
  def expanded(self):
    return self.width * self.expansion

  @property
  def squeezed(self):
    return max(1, int(self.expanded * self.se_ratio))

  @property
  def output_adapter_channels(self):
    return DESIGNS[self.design]

  @property
  def bank_size(self):
    """Number of stacked templates: L for the plain network (every layer its own block)."""
    return self.num_layers if self.signature == "plain" else self.num_templates

  @property
  def num_rows(self):
    """Rows of the per-task variables (mixture logits, per-task BN and adapter, moving
    statistics): one per task, or one for all with task_free (the network never reads the
    task; the tasks only name the data's domains)."""
    return 1 if self.task_free else len(self.tasks)

  def head_name(self, task):
    """The key of `task`'s logits layer under params/heads: the task, or TASK_FREE_HEAD."""
    return TASK_FREE_HEAD if self.task_free else self.tasks[self.task_index(task)][0]

  @property
  def per_task_signatures(self):
    """Whether explicit_signature gives each task its own (a tuple of tuples)."""
    return bool(self.explicit_signature) and isinstance(self.explicit_signature[0], tuple)

  @property
  def fixed_signatures(self) -> Optional[tuple]:
    """Each task's 0-based template per layer (None for a learned signature)."""
    if self.signature == templates.LEARNED:
      return None
    if self.per_task_signatures:
      return tuple(tuple(t - 1 for t in row) for row in self.explicit_signature)
    signature = templates.build_signature(self.signature, self.num_layers, self.bank_size,
                                          self.explicit_signature, self.signature_seed)
    return (signature,) * self.num_rows

  @property
  def dtype(self):
    """The jnp dtype of activations and convolutions (COMPUTE_DTYPES)."""
    return COMPUTE_DTYPES[self.compute_dtype]

  @property
  def uses_scan(self):
    if self.layer_iteration == "auto":
      return self.num_layers >= AUTO_SCAN_MIN_LAYERS
    return self.layer_iteration == "scan"

  def task_index(self, task):
    """The row of `task` (a name or an index) in the per-task variables."""
    names = [name for name, _ in self.tasks]
    if isinstance(task, int):
      return 0 if self.task_free else task
    if task not in names:
      raise ValueError(f"Unknown task {task!r}; the model's tasks are {names}")
    return 0 if self.task_free else names.index(task)


def config_defaults():
  """`config.model`'s fields and their defaults: NetworkSpec's own, with explicit_signature as
  the string a command line gives ("1,2,2,3")."""
  values = {field.name: field.default for field in dataclasses.fields(NetworkSpec)
            if field.name not in ("tasks", "input_channels")}
  values["explicit_signature"] = ""
  return values


def task_owners(spec, path):
  """The tasks that own a variable, by its "/"-joined path (collection first): a tuple of task
  names along axis 0 for arrays with one row per task, (task,) for a task's head, None for a
  variable all tasks share. Transfer and the trainable masks use this to touch only some
  tasks' rows."""
  names = tuple(name for name, _ in spec.tasks)
  if (path == "params/mixture_logits" or path.startswith("batch_stats/block_bn/")
      or (spec.batch_norm == "per_task" and path.startswith("params/block_bn/"))
      or (spec.input_adapter == "per_task" and path.startswith("params/input_adapter/"))):
    return names
  if path.startswith("params/heads/"):
    return (path.split("/")[2],)
  return None


def parse_explicit_signature(value):
  """config.model.explicit_signature as a tuple of 1-based template indices, one per layer
  ("1,2,2,3"), or a tuple of such tuples, one per task in the model's (sorted) task order
  ("1,2,2,3;1,1,2,3"). A malformed entry is an error naming the field."""
  if isinstance(value, str):
    rows = [row for row in value.replace(" ", "").split(";") if row]
    try:
      value = [tuple(int(t) for t in row.split(",") if t) for row in rows]
    except ValueError:
      raise ValueError(f"config.model.explicit_signature={value!r}: give 1-based template "
                       f"indices separated by commas, and tasks by ';' (e.g. '1,2,2,3' or "
                       f"'1,2,2,3;1,1,2,3').") from None
    return value[0] if len(value) == 1 else tuple(value)
  value = tuple(value)
  if value and isinstance(value[0], (tuple, list)):
    return tuple(tuple(int(t) for t in row) for row in value)
  return tuple(int(t) for t in value)


def _choice(name, value, options):
  if value not in options:
    raise ValueError(f"config.model.{name} must be one of {tuple(options)}, got {value!r}")


# The model's numeric fields and the interval each must lie in (ranges.check_number).
NUMBER_RANGES = {
    "depth_multiplier": (0, INF, False, False),
    "dropout_rate": (0, 1, True, False),
    "se_ratio": (0, 1, False, True),
    "mixture_init_scale": (0, INF, True, False),
    "bn_momentum": (0, 1, False, False),
    "bn_eps": (0, INF, False, False),
}
POSITIVE_INTEGERS = ("num_layers", "num_templates", "expansion", "patch_size", "input_channels",
                     "scan_unroll")


def _validate(spec):
  if not spec.tasks:
    raise ValueError("The model needs at least one task (name, num_classes).")
  for name, classes in spec.tasks:
    if classes < 2:
      raise ValueError(f"Task {name!r} has {classes} classes; a classifier needs at least 2.")
  for name in POSITIVE_INTEGERS:
    ranges.check_positive_integer(f"config.model.{name}", getattr(spec, name))
  for name, interval in NUMBER_RANGES.items():
    ranges.check_number(f"config.model.{name}", getattr(spec, name), interval)
  _choice("design", spec.design, DESIGNS)
  _choice("activation", spec.activation, ops.ACTIVATIONS)
  _choice("signature", spec.signature, templates.SIGNATURES)
  _choice("mixture_init", spec.mixture_init, templates.MIXTURE_INITS)
  _choice("batch_norm", spec.batch_norm, BATCH_NORM_MODES)
  _choice("input_adapter", spec.input_adapter, INPUT_ADAPTER_MODES)
  _choice("layer_iteration", spec.layer_iteration, LAYER_ITERATIONS)
  _choice("conv_impl", spec.conv_impl, ops.CONV_IMPLS + ("auto",))
  _choice("compute_dtype", spec.compute_dtype, COMPUTE_DTYPES)
  _choice("remat", spec.remat, REMAT_POLICIES)
  _choice("routing", spec.routing, ROUTINGS)
  problem = ops.conv_impl_problem(spec.conv_impl)
  if problem:
    raise ValueError(f"config.model.{problem}.")
  if spec.signature == "explicit":
    _validate_explicit_signature(spec)
  if spec.shared_mixture_layers:
    _validate_shared_mixture_layers(spec)
  if spec.routing != "task":
    _validate_content_routing(spec)
  if spec.task_free:
    _validate_task_free(spec)
  if spec.signature == "progressive" and spec.num_layers < spec.num_templates:
    raise ValueError(f"A progressive signature uses every template at least once, so "
                     f"num_layers ({spec.num_layers}) must be >= num_templates "
                     f"({spec.num_templates}).")


def _validate_explicit_signature(spec):
  rows = spec.explicit_signature if spec.per_task_signatures else (spec.explicit_signature,)
  if spec.per_task_signatures and len(rows) != len(spec.tasks):
    raise ValueError(f"config.model.explicit_signature gives {len(rows)} per-task signatures "
                     f"but the model has {len(spec.tasks)} tasks "
                     f"{[name for name, _ in spec.tasks]}; give one per task, in that order.")
  for sig in rows:
    if len(sig) != spec.num_layers:
      raise ValueError(f"config.model.explicit_signature has {len(sig)} entries but "
                       f"num_layers is {spec.num_layers}; give one template per layer.")
    if not all(1 <= t <= spec.num_templates for t in sig):
      raise ValueError(f"config.model.explicit_signature entries are 1-based template indices "
                       f"in 1..{spec.num_templates}, got {sig}")


def _validate_shared_mixture_layers(spec):
  shared = spec.shared_mixture_layers
  if spec.signature != templates.LEARNED:
    raise ValueError(f"config.model.shared_mixture_layers={shared} shares mixture weights, "
                     f"which signature={spec.signature!r} does not have; use "
                     f"signature='mixture' or shared_mixture_layers=0.")
  if not 0 <= shared < spec.num_layers:
    raise ValueError(f"config.model.shared_mixture_layers must be in 0..{spec.num_layers - 1} "
                     f"(num_layers - 1: the last layers keep per-task mixture weights), got "
                     f"{shared}.")


def _validate_content_routing(spec):
  routing = f"config.model.routing={spec.routing!r}"
  if spec.signature != templates.LEARNED:
    raise ValueError(f"{routing} mixes the templates per example, which "
                     f"signature={spec.signature!r} (one fixed template per layer) does not; "
                     f"use signature='mixture' or routing='task'.")
  if spec.batch_norm == "mixed":
    raise ValueError(f"{routing} mixes kernels and SE per example but keeps BN scale and "
                     f"offset per layer or task; batch_norm='mixed' (BN in the templates) would "
                     f"need them per example too: use batch_norm='per_layer' or 'per_task', or "
                     f"routing='task'.")
  if spec.routing == "task_posterior" and spec.input_adapter != "shared":
    raise ValueError("config.model.routing='task_posterior' infers the task from the input "
                     "adapter's output, so that adapter cannot depend on the task: use "
                     "input_adapter='shared'.")


def _validate_task_free(spec):
  classes = {name: count for name, count in spec.tasks}
  if len(set(classes.values())) > 1:
    raise ValueError(f"config.model.task_free=True gives every task one head, so the tasks "
                     f"need the same classes; their class counts are {classes}. Train tasks "
                     f"with other labels with task_free=False.")
  if spec.routing == "task_posterior":
    raise ValueError("config.model.task_free=True already never reads the task, so "
                     "routing='task_posterior' has no task to infer: use routing='task' (one "
                     "xi for all) or 'example' (a router per image).")
  if spec.per_task_signatures:
    raise ValueError("config.model.task_free=True gives all tasks one signature; "
                     "explicit_signature gives one per task (';'): give one, or "
                     "task_free=False.")
