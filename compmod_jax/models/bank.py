"""Pure edits of a template bank and its mixture weights (paper §3: a model is a bank of
templates plus a few numbers per task): hardening each layer to its favourite template, and
pruning the least used templates. Numpy in, numpy out; finetune/surgery.py turns them into
new workdirs."""
import jax
import numpy as np

from compmod_jax.models import templates


def hardened_signatures(xi):
  """The 0-based template of each task and layer: arg-max over K of xi [tasks, L, K] (the
  first template on a tie)."""
  return np.argmax(np.asarray(xi), axis=-1)


def compact_variables(variables, signatures):
  """(variables of the fixed-signature model, its signatures) from a learned-signature model's
  variables and hardened `signatures` [tasks, L]: the templates no signature uses are dropped
  (the others keep their order) and the mixture logits removed."""
  used = np.unique(signatures)
  params = {name: value for name, value in variables["params"].items()
            if name not in templates.MIXTURE_PARAMS}
  params["templates"] = jax.tree.map(lambda bank: np.asarray(bank)[used], params["templates"])
  renumbered = np.searchsorted(used, signatures)
  return {"params": params, "batch_stats": variables["batch_stats"]}, renumbered


def pruned_variables(variables, keep):
  """(variables without the templates outside the `keep` most used ones, the kept 0-based
  templates in their order, every template's usage). The mixture logits lose the dropped
  templates' columns, which renormalises each xi over the kept templates."""
  params = dict(variables["params"])
  usage = templates.template_usage(params)
  kept = np.sort(np.argsort(-usage, kind="stable")[:keep])
  params["templates"] = jax.tree.map(lambda bank: np.asarray(bank)[kept], params["templates"])
  for name in templates.MIXTURE_PARAMS:
    if name in params:
      params[name] = np.asarray(params[name])[..., kept]
  return {"params": params, "batch_stats": variables["batch_stats"]}, kept, usage
