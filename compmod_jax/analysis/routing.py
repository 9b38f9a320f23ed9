"""Routing health: how the layers of a model use its K templates.

A route is one distribution over the K templates per layer: a task's mixture weights xi_t
(paper Eq. 1), a fixed signature's one-hot rows, or, with routing='example', one test image's
xi(x), each task's images weighted as much as another task's. Over the routes of a model, per
layer l:

  usage[l, k]          = mean over routes of xi[l, k]          (the mean route)
  entropy_of_mean[l]   = H(usage[l])                          (nats)
  mean_entropy[l]      = mean over routes of H(xi[l])
  mutual_information[l] = entropy_of_mean[l] - mean_entropy[l]  >= 0 (H is concave): the
                          information the route carries about which task (or image) it is,
                          I(task; template) under uniform tasks, as mttl logs it
  balance[l]           = exp(entropy_of_mean[l]) / K          1: every template used alike

and over the whole bank: each template's usage averaged over layers, and the cosine similarity
of every two templates' kernels (every conv and SE kernel, flattened): two templates whose
kernels point the same way compute nearly the same block, so the bank has fewer templates than
it pays for. `warnings` says so in words, and says which templates carry almost no weight.
"""
import numpy as np

# A template is unused when its mean usage is below this fraction of a uniform share (1/K).
UNUSED_SHARE = 0.1
# Two templates have collapsed into one when their kernels' cosine similarity exceeds this.
COLLAPSED_COSINE = 0.95


def _entropy(probabilities):
  """Entropy (nats) over the last axis; 0 log 0 = 0."""
  logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
  return -np.sum(probabilities * logs, axis=-1)


def route_statistics(routes, route_entropy=None):
  """The per-layer statistics of the module docstring for `routes` [R, L, K] (R routes, each a
  distribution over K templates per layer), weighted alike. When each route is itself the mean
  of a group's routes (a task's test images under routing='example'), `route_entropy` [R, L]
  gives the group's mean entropy, so that mean_entropy is the mean over every example's own."""
  routes = np.asarray(routes, np.float64)
  usage = routes.mean(axis=0)
  entropy_of_mean = _entropy(usage)
  if route_entropy is None:
    route_entropy = _entropy(routes)
  mean_entropy = np.asarray(route_entropy, np.float64).mean(axis=0)
  return {"usage": usage, "entropy_of_mean": entropy_of_mean, "mean_entropy": mean_entropy,
          "mutual_information": entropy_of_mean - mean_entropy,
          "balance": np.exp(entropy_of_mean) / routes.shape[-1]}


def template_cosine(templates):
  """[K, K] cosine similarity of the templates' kernels: `templates` is the model's
  params["templates"], every leaf stacked on a leading K axis; the leaves named *kernel (the
  convolutions and the SE layers' dense kernels) are flattened and joined per template."""
  kernels = [np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
             for name, leaf in sorted(templates.items()) if name.endswith("kernel")]
  flat = np.concatenate(kernels, axis=1)
  norms = np.linalg.norm(flat, axis=1, keepdims=True)
  unit = flat / np.where(norms > 0, norms, 1.0)
  return unit @ unit.T


def health(xi_by_task, templates, mean_entropy=None):
  """Routing health of a model (JSON-able): the route statistics of its tasks' xi
  ({task: [L, K]}) per layer, each template's usage over the whole depth, the templates' kernel
  cosine similarity and the warnings they give (templates are numbered from 1, as in the
  signatures the docs print), and each task's route (`usage_by_task`: the pictures show it). A
  model that routes each image gives each task's mean route over its test images as its xi
  and their mean entropy ({task: [L]}) as `mean_entropy`: its `usage_by_task` is then the
  domain-by-template picture, and the mutual information is the one between an image and its
  route, tasks weighted alike."""
  tasks = sorted(xi_by_task)
  stats = route_statistics(np.stack([xi_by_task[task] for task in tasks]),
                           None if mean_entropy is None else
                           np.stack([mean_entropy[task] for task in tasks]))
  cosine = template_cosine(templates)
  template_usage = stats["usage"].mean(axis=0)
  result = {key: value.tolist() for key, value in stats.items()}
  pairs = cosine[np.triu_indices(len(cosine), k=1)]
  result.update(template_usage=template_usage.tolist(), template_cosine=cosine.tolist(),
                max_template_cosine=float(pairs.max()) if pairs.size else None)
  result["usage_by_task"] = {task: np.asarray(xi_by_task[task]).tolist() for task in tasks}
  result["warnings"] = warnings(template_usage, cosine)
  return result


def warnings(template_usage, cosine):
  """One sentence per unused template and per pair of collapsed templates."""
  num_templates = len(template_usage)
  said = []
  for k, share in enumerate(template_usage):
    if share < UNUSED_SHARE / num_templates:
      said.append(f"template {k + 1} is unused: it carries {100 * share:.2f}% of the mixture "
                  f"weight over tasks and layers (a uniform share is {100 / num_templates:.2f}%)")
  for k in range(num_templates):
    for other in range(k + 1, num_templates):
      if cosine[k, other] > COLLAPSED_COSINE:
        said.append(f"templates {k + 1} and {other + 1} have collapsed into one: their kernels' "
                    f"cosine similarity is {cosine[k, other]:.3f}")
  return said


def scalars(result):
  """TensorBoard scalars of a `health` result: per layer and per template."""
  out = {f"routing/template_usage/template_{k + 1:02d}": share
         for k, share in enumerate(result["template_usage"])}
  for key in ("balance", "entropy_of_mean", "mean_entropy", "mutual_information"):
    for layer, value in enumerate(result[key]):
      out[f"routing/{key}/layer_{layer + 1:02d}"] = value
  if result["max_template_cosine"] is not None:  # None: one template, no pair
    out["routing/max_template_cosine"] = result["max_template_cosine"]
  return out
