"""The compositional isometric network (paper §3, §4.1, App. A.1).

input adapter -> L residual blocks whose parameters mix K shared templates -> output adapter
-> dropout -> one logits head per task.

Variables:
  params/input_adapter       patchify conv (kernel = stride) + bias; with a leading task axis
                             when input_adapter = "per_task"
  params/templates           every block parameter stacked on a leading K axis (with BN
                             scale/bias under "bn" when batch_norm = "mixed")
  params/mixture_logits      [tasks, L - n, K]; xi = softmax over K (learned signature only)
  params/shared_mixture_logits  [n, K]: the first n layers' logits, one row all tasks share
                             (model.shared_mixture_layers = n > 0; paper Tables 11/12)
  params/router/kernel       [L, C, K] (routing = "example"): each layer's input, pooled over
                             space, adds `pooled @ kernel[l]` to the task's mixture logits, so
                             every example gets its own xi (paper Eq. 1 with content)
  params/router/{kernel,bias}  [C, tasks] and [tasks] (routing = "task_posterior"): the domain
                             classifier p(t|x) on the input adapter's output pooled over space;
                             in evaluation each example uses xi(x) = sum_t p(t|x) xi_t
  params/block_bn            BN scale/bias, [L, C] ("per_layer") or [tasks, L, C] ("per_task")
  params/output_adapter      1x1 conv to c1, average pool, dense to c2
  params/heads/<task>        logits layer of each task
  batch_stats/block_bn       BN moving mean/var, [tasks, L, C]: per task and layer, never mixed

With task_free the network never reads the task: every "[tasks, ...]" above has one row, and
params/heads/all_tasks is the one logits layer (the tasks only name the data's domains).
"""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from compmod_jax.models import blocks, ops, templates
from compmod_jax.models.network_spec import NetworkSpec, REMAT_POLICIES


class CompositionalIsometricNet(nn.Module):
  """See the module docstring. Call with a task (index or name) to get that task's logits."""
  spec: NetworkSpec

  def setup(self):
    spec = self.spec
    c1, c2 = spec.output_adapter_channels
    num_tasks = spec.num_rows
    self.input_adapter = self.param("input_adapter", self._init_input_adapter)
    self.templates = self.param("templates", self._init_templates)
    if spec.signature == templates.LEARNED:
      shared = spec.shared_mixture_layers
      self.mixture_logits = self.param(
          "mixture_logits", _init_own_mixture_logits, spec,
          (num_tasks, spec.num_layers, spec.bank_size))
      if shared:
        # Drawn as one task's logits are (config.model.mixture_init), first n layers kept.
        self.shared_mixture_logits = self.param(
            "shared_mixture_logits",
            lambda key: templates.init_mixture_logits(
                key, spec.mixture_init, (1, spec.num_layers, spec.bank_size),
                spec.mixture_init_scale)[0, :shared])
    if spec.routing == "example":
      # Zero: every example starts on its task's xi, so a model loaded from a per-task
      # checkpoint computes what that checkpoint did until the router learns.
      self.router = self.param("router", lambda key: {
          "kernel": jnp.zeros((spec.num_layers, spec.width, spec.bank_size))})
    elif spec.routing == "task_posterior":
      # Zero: a uniform posterior until the classifier has seen the domains.
      self.router = self.param("router", lambda key: {
          "kernel": jnp.zeros((spec.width, num_tasks)), "bias": jnp.zeros((num_tasks,))})
    bn_prefix = {"per_layer": (spec.num_layers,), "per_task": (num_tasks, spec.num_layers)}
    if spec.batch_norm in bn_prefix:
      self.block_bn = self.param("block_bn", _init_bn_params, self._bn_channels(),
                                 bn_prefix[spec.batch_norm])
    self.bn_stats = self.variable("batch_stats", "block_bn", _init_bn_stats, self._bn_channels(),
                                  (num_tasks, spec.num_layers))
    self.output_adapter = self.param("output_adapter", _init_dense_tree, {
        "conv_kernel": (spec.width, c1), "conv_bias": (c1,),
        "dense_kernel": (c1, c2), "dense_bias": (c2,)})
    self.heads = self.param("heads", _init_dense_tree, {
        spec.head_name(name): {"kernel": (c2, classes), "bias": (classes,)}
        for name, classes in spec.tasks})
    self.dropout = nn.Dropout(spec.dropout_rate)

  def __call__(self, images, task=0, train=False):
    """Logits of `task` for NHWC images. In training, updates that task's BN statistics."""
    return self._logits(self._body(images, task, train, True)[0], task, train)

  def logits_and_routes(self, images, task=0):
    """Evaluation's logits and each layer's mixture weights for every image, [L, N, K]
    (routing='example': the router's output; 'task_posterior': sum_t p(t|x) xi_t), from one
    pass."""
    if self.spec.routing == "task":
      raise ValueError("Routes per image come from the router of routing='example' or "
                       "'task_posterior'; this model has routing='task', whose xi are its "
                       "mixture weights.")
    features, _, routes = self._body(images, task, False, False, with_routes=True)
    return self._logits(features, task, False), routes

  def routes(self, images, task=0):
    """Each layer's mixture weights for every image in evaluation, [L, N, K], float32."""
    return self.logits_and_routes(images, task)[1]

  def _logits(self, features, task, train):
    embedding = self.dropout(self._embed(features), deterministic=not train)
    head = self._in_compute_dtype(self.heads[self.spec.head_name(task)])
    return ops.at_least_float32(embedding @ head["kernel"] + head["bias"])

  def embedding(self, images, task=0, train=False):
    """Output of the output adapter (what the heads read, before dropout), [N, c2], float32."""
    return ops.at_least_float32(self._embed(self._body(images, task, train, True)[0]))

  def body_features(self, images, task=0, train=False, update_stats=True):
    """Output of the last block (the input of the output adapter), [N, H', W', C], float32;
    with update_stats=False, also the blocks' batch statistics (see batch_statistics)."""
    features, batch_stats = self._body(images, task, train, update_stats)
    features = ops.at_least_float32(features)
    return features if update_stats else (features, batch_stats)

  def task_given_logits(self, images, task=0):
    """routing='task_posterior': evaluation's logits with the images' task given, as the
    per-task model computes them (the oracle the inferred task is compared with)."""
    task_index = self.spec.task_index(task)
    features = self._run_blocks(self._adapt(images, task_index), task_index, False, False)[0]
    return self._logits(features, task, False)

  def domain_posterior(self, images):
    """routing='task_posterior': p(t|x) over the model's tasks for every image, [N, tasks],
    float32."""
    return jax.nn.softmax(self._domain_logits(self._adapt(images, 0)))

  def _body(self, images, task, train, update_stats, with_routes=False):
    """(output of the last block in the compute dtype, the blocks' batch statistics[, the
    routes])."""
    task_index = self.spec.task_index(task)
    x = self._adapt(images, task_index)
    posterior = None
    if self.spec.routing == "task_posterior":
      domain_logits = self._domain_logits(x)
      if train:
        # The classifier learns the domain labels; the body trains as the task's own model,
        # so a one-hot posterior in evaluation is that model, BN statistics included.
        self.sow("losses", "domain_cross_entropy", jnp.mean(
            jax.nn.logsumexp(domain_logits, -1) - domain_logits[:, task_index]))
      else:
        posterior = jax.nn.softmax(domain_logits)
    return self._run_blocks(x, task_index, train, update_stats, with_routes, posterior)

  def _adapt(self, images, task_index):
    """The input adapter's output (patchify conv + act) in the compute dtype."""
    act = ops.ACTIVATIONS[self.spec.activation]
    adapter = self.input_adapter
    if self.spec.input_adapter == "per_task":
      adapter = jax.tree.map(lambda p: p[task_index], adapter)
    adapter, images = self._in_compute_dtype((adapter, images))
    return act(ops.patchify_conv(images, adapter["kernel"], adapter["bias"]))

  def _domain_logits(self, x):
    # No gradient into the adapter: the domain loss trains the classifier alone, so the body
    # trains as the per-task model's does (through the adapter it stalled the five colour
    # domains near chance; docs/model.md).
    pooled = jax.lax.stop_gradient(ops.at_least_float32(jnp.mean(x, axis=(1, 2))))
    return pooled @ self.router["kernel"] + self.router["bias"]

  def _embed(self, features):
    """Output adapter: 1x1 conv + act, global average pool, dense + act (compute dtype)."""
    act = ops.ACTIVATIONS[self.spec.activation]
    p, features = self._in_compute_dtype((self.output_adapter, features))
    h = act(ops.conv1x1(features, p["conv_kernel"]) + p["conv_bias"])
    return act(jnp.mean(h, axis=(1, 2)) @ p["dense_kernel"] + p["dense_bias"])

  def layer_parameters(self, task_index):
    """Block parameters and BN scale/bias of every layer for one task, stacked on axis L."""
    layer_params = dict(self._layer_templates(task_index))  # setup() gives FrozenDicts
    if self.spec.batch_norm == "mixed":
      return layer_params, layer_params.pop("bn")
    return layer_params, self._layer_bn(task_index)

  def _layer_bn(self, task_index):
    """BN scale/bias of every layer for one task ("per_layer" or "per_task" batch norm)."""
    if self.spec.batch_norm == "per_task":
      return jax.tree.map(lambda p: p[task_index], self.block_bn)
    return self.block_bn

  def _layer_templates(self, task_index):
    """The template bank mixed by the task's xi, or indexed by its fixed signature."""
    spec = self.spec
    if spec.fixed_signatures is None:
      logits = templates.task_mixture_logits(self._mixture_params())[task_index]
      return templates.mix_templates(templates.mixture_weights(logits), self.templates)
    signature = spec.fixed_signatures[task_index]
    if signature == tuple(range(spec.bank_size)):
      return self.templates  # plain network: the bank already is per layer
    return templates.select_templates(signature, self.templates)

  def _in_compute_dtype(self, tree):
    """A tree of arrays in config.model.compute_dtype; as it is for "float32" (which leaves a
    float64 input, under jax_enable_x64, in float64)."""
    if self.spec.compute_dtype == "float32":
      return tree
    return jax.tree.map(lambda a: a.astype(self.spec.dtype), tree)

  def _mixture_params(self):
    params = {"mixture_logits": self.mixture_logits}
    if self.spec.shared_mixture_layers:
      params["shared_mixture_logits"] = self.shared_mixture_logits
    return params

  def batch_statistics(self, images, task=0):
    """The BN batch statistics {name: {"mean", "var"}} ([L, C] each) of every layer of `task`
    on `images`, as a training step computes them, leaving the moving statistics alone: their
    mean over many batches re-estimates the moving ones (precise BN; AdaBN on a new domain)."""
    return self.body_features(images, task, train=True, update_stats=False)[1]

  def _run_blocks(self, x, task_index, train, update_stats, with_routes=False, posterior=None):
    """The blocks' output and, in training, their batch statistics (folded into the moving
    ones when `update_stats`); with `with_routes`, also every layer's per-example mixture
    weights [L, N, K]. A `posterior` [N, tasks] routes every example by it instead of by
    `task_index` (routing='task_posterior' in evaluation)."""
    spec = self.spec
    stats = jax.tree.map(lambda s: s[task_index], self.bn_stats.value)
    skip = x if spec.input_skip else None

    def block(h, layer):
      return blocks.inverted_residual(
          h, skip, layer, train=train,
          activation=ops.ACTIVATIONS[spec.activation],
          conv_impl=ops.resolve_conv_impl(spec.conv_impl), bn_eps=spec.bn_eps)

    if posterior is not None:
      block, per_layer = self._posterior_block(block, posterior)
    elif spec.routing == "example":
      block, per_layer = self._routed_block(block, task_index, stats)
    else:
      layer_params, bn = self.layer_parameters(task_index)
      layer_params = self._in_compute_dtype(layer_params)  # mixed in float32, then cast
      per_layer = (layer_params, bn, stats)
      block = _without_routes(block)
    if REMAT_POLICIES[spec.remat] is not None:
      # Under scan the loop already keeps the recomputation apart from the forward pass, so
      # common-subexpression elimination needs no barrier (jax.checkpoint's docs).
      block = jax.checkpoint(block, policy=REMAT_POLICIES[spec.remat],
                             prevent_cse=not spec.uses_scan)
    if spec.uses_scan:
      x, (batch_stats, routes) = jax.lax.scan(block, x, per_layer, unroll=spec.scan_unroll)
    else:
      outputs = []
      for layer in range(spec.num_layers):
        x, layer_outputs = block(x, jax.tree.map(lambda a, i=layer: a[i], per_layer))
        outputs.append(layer_outputs)
      batch_stats, routes = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    if train and update_stats and not self.is_initializing():
      self._update_moving_stats(task_index, stats, batch_stats)
    return (x, batch_stats, routes) if with_routes else (x, batch_stats)

  def _routed_block(self, block, task_index, stats):
    """routing='example': the block whose parameters mix the template bank per example, by
    xi(x) = softmax(task's mixture logits + pooled block input @ router kernel), and the
    per-layer inputs it scans over. The bank enters every layer whole (it is shared across
    depth); the mixing is in float32, then cast to the compute dtype, as for routing='task'."""
    layer_logits = templates.task_mixture_logits(self._mixture_params())[task_index]
    bank = self.templates

    def routed(h, layer):
      logits, router_kernel, bn, layer_stats = layer
      pooled = ops.at_least_float32(jnp.mean(h, axis=(1, 2)))
      routes = templates.mixture_weights(logits + pooled @ router_kernel)  # [N, K]
      params = self._in_compute_dtype(templates.mix_templates_per_example(routes, bank))
      h, batch_stats = block(h, (params, bn, layer_stats))
      return h, (batch_stats, routes)

    return routed, (layer_logits, self.router["kernel"], self._layer_bn(task_index), stats)

  def _posterior_block(self, block, posterior):
    """routing='task_posterior' in evaluation: the block whose parameters mix the bank per
    example by xi(x) = sum_t p(t|x) xi_t, with BN scale and offset mixed by p(t|x) too
    (per-task BN) and the moving statistics of the mixture of the tasks' activations: mean
    sum_t p_t mu_t, variance sum_t p_t (var_t + (mu_t - mean)^2) (law of total variance; with
    a one-hot posterior both are that task's, exactly)."""
    spec = self.spec
    xi = templates.mixture_weights(templates.task_mixture_logits(self._mixture_params()))
    routes = jnp.einsum("nt,tlk->lnk", posterior, xi)
    per_example = lambda a: a[:, :, None, None, :]  # [L, N, C] -> [L, N, 1, 1, C]: NHWC
    mix = lambda per_task: per_example(jnp.einsum("nt,tlc->lnc", posterior, per_task))
    bn = self._layer_bn(0) if spec.batch_norm == "per_layer" else jax.tree.map(
        mix, self.block_bn)

    def mixed_stats(stats):
      mean = jnp.einsum("nt,tlc->lnc", posterior, stats["mean"])
      spread = stats["var"][:, :, None] + jnp.square(stats["mean"][:, :, None] - mean)
      return {"mean": per_example(mean),
              "var": per_example(jnp.einsum("nt,tlnc->lnc", posterior, spread))}

    stats = jax.tree.map(mixed_stats, self.bn_stats.value,
                         is_leaf=lambda node: isinstance(node, dict) and "mean" in node)
    bank = self.templates

    def routed(h, layer):
      layer_routes, layer_bn, layer_stats = layer
      params = self._in_compute_dtype(templates.mix_templates_per_example(layer_routes, bank))
      h, batch_stats = block(h, (params, layer_bn, layer_stats))
      return h, (batch_stats, layer_routes)

    return routed, (routes, bn, stats)

  def _update_moving_stats(self, task_index, old, batch):
    momentum = self.spec.bn_momentum
    new = jax.tree.map(lambda o, b: momentum * o + (1.0 - momentum) * b, old,
                       jax.lax.stop_gradient(batch))
    self.bn_stats.value = jax.tree.map(lambda all_tasks, n: all_tasks.at[task_index].set(n),
                                       self.bn_stats.value, new)

  def _bn_channels(self):
    return blocks.bn_channels(self.spec.width, self.spec.expanded)

  def _init_input_adapter(self, key):
    spec = self.spec
    adapter = _init_dense_tree(key, {
        "kernel": (spec.patch_size, spec.patch_size, spec.input_channels, spec.width),
        "bias": (spec.width,)})
    if spec.input_adapter == "shared":
      return adapter
    # Every task starts from the same adapter, as when a shared one is loaded into each row.
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (spec.num_rows,) + p.shape), adapter)

  def _init_templates(self, key):
    spec = self.spec
    shapes = blocks.template_shapes(spec.width, spec.expanded, spec.squeezed, spec.use_se,
                                    spec.input_skip)
    bank = jax.vmap(lambda k: blocks.init_template(k, shapes))(
        jax.random.split(key, spec.bank_size))
    if spec.batch_norm == "mixed":
      bank["bn"] = _init_bn_params(None, self._bn_channels(), (spec.bank_size,))
    return bank


def _without_routes(block):
  """A block for routing='task', with the (absent) routes beside its batch statistics."""
  def block_without_routes(h, layer):
    h, batch_stats = block(h, layer)
    return h, (batch_stats, None)
  return block_without_routes


def _init_own_mixture_logits(key, spec, shape):
  """Every task's logits for the layers after the shared ones (all layers when none are)."""
  logits = templates.init_mixture_logits(key, spec.mixture_init, shape, spec.mixture_init_scale)
  return logits[:, spec.shared_mixture_layers:]


def _init_dense_tree(key, shapes):
  """He-normal kernels (fan-in = all but the last axis) and zero biases for a tree of shapes."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(leaves))
  values = []
  for key_i, shape in zip(keys, leaves):
    if len(shape) == 1:
      values.append(jnp.zeros(shape))
    else:
      fan_in = math.prod(shape[:-1])
      values.append((2.0 / fan_in) ** 0.5 * jax.random.truncated_normal(key_i, -2.0, 2.0, shape))
  return jax.tree.unflatten(treedef, values)


def _init_bn_params(key, channels, prefix):
  del key
  return {name: {"scale": jnp.ones(prefix + (c,)), "bias": jnp.zeros(prefix + (c,))}
          for name, c in channels.items()}


def _init_bn_stats(channels, prefix):
  return {name: {"mean": jnp.zeros(prefix + (c,)), "var": jnp.ones(prefix + (c,))}
          for name, c in channels.items()}
