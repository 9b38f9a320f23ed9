"""Growing a trained model by templates (paper §1: new tasks are trained "by tuning
task-specific mixture weights and potentially adding new trainable templates").

With config.init_from and config.transfer.add_templates = n, the checkpoint's K templates
become K + n (config.model.num_templates must say K + n):
  - the new templates start as config.transfer.new_templates says: "fresh" (this model's own
    initialisation of those rows) or "copies" (the n most used templates, usage = mixture
    weight summed over layers and tasks, each array plus Gaussian noise of
    config.transfer.new_templates_noise times that array's standard deviation);
  - every task of the checkpoint gets the mixture logit NEW_TEMPLATE_LOGIT for the new
    templates. exp(-1e4) underflows to exactly 0 in float32, so their mixture weights for them
    are exactly 0 and their mixtures are what they were; their rows stay frozen as always, and
    so do the old templates (optim.trainable_mask lets only the n added rows of the bank
    train), so nothing these tasks compute can change;
  - a new task's xi row comes from config.xi_init (finetune/transfer.py), then the new templates
    get the share a uniform xi gives them: 1/(K+n) each, the old templates' weights scaled by
    K/(K+n) (`with_new_template_share`). Layers whose xi all tasks share
    (config.model.shared_mixture_layers) keep weight 0 on the new templates.
Chained, this is the paper's continual growth: each run appends one task and possibly templates
to the model of the run before.
"""
import jax
import numpy as np

from compmod_jax.models import templates

NEW_TEMPLATE_LOGIT = -1e4  # not -inf: a non-finite parameter would stop the run
NEW_TEMPLATE_INITS = ("fresh", "copies")


def check_config(config):
  """Errors for config.transfer.add_templates and its fields, raised before any heavy work."""
  transfer = config.transfer
  if transfer.new_templates not in NEW_TEMPLATE_INITS:
    raise ValueError(f"config.transfer.new_templates must be one of {NEW_TEMPLATE_INITS}, got "
                     f"{transfer.new_templates!r}")
  if transfer.add_templates < 0:
    raise ValueError(f"config.transfer.add_templates must be an integer >= 0, got "
                     f"{transfer.add_templates!r}")
  if not transfer.add_templates:
    return
  if not (config.init_from or config.get("pretrain")):
    raise ValueError(f"config.transfer.add_templates={transfer.add_templates} grows a trained "
                     f"model: set config.init_from=<its workdir>.")
  if config.model.signature != templates.LEARNED:
    raise ValueError(f"config.transfer.add_templates needs mixture weights to reach the new "
                     f"templates; config.model.signature is {config.model.signature!r}, "
                     f"set it to {templates.LEARNED!r}.")
  if config.model.routing != "task":
    raise ValueError(f"config.transfer.add_templates grows the per-task mixture weights; "
                     f"config.model.routing={config.model.routing!r} also routes by a router "
                     f"whose output has one column per template, which growth does not extend: "
                     f"grow with routing='task'.")


def bank_size(variables):
  """Number of templates in a model's variables."""
  return int(jax.tree.leaves(variables["params"]["templates"])[0].shape[0])


def check_source(config, variables):
  """Refuses a model whose number of templates is not the checkpoint's plus
  config.transfer.add_templates (before any data is read)."""
  if config.model.signature == "plain":
    return  # its bank is one block per layer; the strict loading compares it
  have, added = bank_size(variables), config.transfer.add_templates
  if config.model.num_templates != have + added:
    raise ValueError(
        f"The checkpoint config.init_from names (with config.deltas) has {have} templates and "
        f"config.transfer.add_templates={added}, so the model needs "
        f"config.model.num_templates={have + added}, not {config.model.num_templates}.")


def grown(config, variables, fresh_templates):
  """(`variables` with config.transfer.add_templates templates appended as the module
  docstring says, what was added for the run information). `fresh_templates` is the new
  model's freshly initialised bank (K + n rows). Host numpy in and out."""
  added = config.transfer.add_templates
  params = dict(variables["params"])
  bank = params["templates"]
  old = bank_size(variables)
  usage = templates.template_usage(params)
  if config.transfer.new_templates == "fresh":
    copied = []
    new_rows = jax.tree.map(lambda fresh: np.asarray(fresh)[old:old + added], fresh_templates)
  else:
    copied = np.argsort(-usage, kind="stable")[np.arange(added) % old]
    noise = np.random.default_rng(config.seed)
    new_rows = jax.tree.map(
        lambda rows: _perturbed(np.asarray(rows)[copied], config.transfer.new_templates_noise,
                                noise), bank)
  params["templates"] = jax.tree.map(
      lambda rows, new: np.concatenate([rows, new.astype(rows.dtype)]), bank, new_rows)
  for name in templates.MIXTURE_PARAMS:
    if name in params:
      params[name] = padded_logits(params[name], added)
  info = {"added": added, "init": config.transfer.new_templates,
          "parameters": int(sum(np.asarray(rows).size for rows in jax.tree.leaves(new_rows))),
          "copied_from": [int(t) + 1 for t in copied],
          "usage_before": np.asarray(usage).round(4).tolist()}
  return {"params": params, "batch_stats": variables["batch_stats"]}, info


def padded_logits(logits, added):
  """Mixture logits [..., K] with `added` columns of NEW_TEMPLATE_LOGIT appended."""
  logits = np.asarray(logits)
  pad = np.full(logits.shape[:-1] + (added,), NEW_TEMPLATE_LOGIT, logits.dtype)
  return np.concatenate([logits, pad], axis=-1)


def _perturbed(rows, scale, noise):
  """Each row (one template's array) plus N(0, (scale * its standard deviation)^2) noise."""
  deviation = rows.reshape(rows.shape[0], -1).std(axis=1).reshape(
      (-1,) + (1,) * (rows.ndim - 1))
  return rows + scale * deviation * noise.standard_normal(rows.shape).astype(rows.dtype)


def with_new_template_share(variables, spec, task, added):
  """`variables` with `task`'s own xi rows giving each of the last `added` templates 1/K of
  every layer (K: all templates) and the others their old weights times (K - added)/K."""
  params = dict(variables["params"])
  logits = np.array(params["mixture_logits"])
  total = logits.shape[-1]
  row = spec.task_index(task)
  old_log_xi = np.asarray(jax.nn.log_softmax(logits[row, :, :total - added], axis=-1))
  logits[row, :, :total - added] = old_log_xi + np.log((total - added) / total)
  logits[row, :, total - added:] = np.log(1.0 / total)
  params["mixture_logits"] = logits
  return {"params": params, "batch_stats": variables["batch_stats"]}


def trainable_shared_entries(config, path, shape):
  """Which entries of a parameter all tasks share (its "/"-joined path in params) a run may
  train when its group trains: the added rows of the template bank when the run grows the
  model (the checkpoint's tasks use the others), else all. True or a [K, 1, ...] bool mask."""
  added = config.transfer.add_templates
  if not added or not path.startswith("templates/"):
    return np.bool_(True)
  rows = np.arange(shape[0]) >= shape[0] - added
  return rows.reshape((shape[0],) + (1,) * (len(shape) - 1))
