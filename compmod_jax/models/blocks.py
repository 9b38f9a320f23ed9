"""The isometric residual block (MobileNetV3 inverted residual) as a pure function.

The block owns no variables: the network hands it one layer's (mixed or selected) parameters,
its BN scale/bias and its BN moving statistics, which keeps one code path for every signature
and lets the layer loop be a Python loop or a `lax.scan`.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn

from compmod_jax.models import ops


def template_shapes(width, expanded, squeezed, use_se, input_skip):
  """Shapes of one template's parameters (all conv kernels and all SE parameters).

  BN after each convolution makes conv biases redundant, so, as in MobileNetV3, the three
  convolutions have none; the SE layers have biases.
  """
  block_input = 2 * width if input_skip else width
  shapes = {
      "expand_kernel": (block_input, expanded),
      "depthwise_kernel": (3, 3, expanded),
      "project_kernel": (expanded, width),
  }
  if use_se:
    shapes.update({
        "se_reduce_kernel": (expanded, squeezed),
        "se_reduce_bias": (squeezed,),
        "se_expand_kernel": (squeezed, expanded),
        "se_expand_bias": (expanded,),
    })
  return shapes


def bn_channels(width, expanded):
  return {"expand": expanded, "depthwise": expanded, "project": width}


def init_template(key, shapes):
  """He-normal (truncated) kernels, zero biases, for one template."""
  params = {}
  for name, key_k in zip(sorted(shapes), jax.random.split(key, len(shapes))):
    shape = shapes[name]
    if name.endswith("bias"):
      params[name] = jnp.zeros(shape)
    else:
      fan_in = 9 if name == "depthwise_kernel" else shape[0]
      std = (2.0 / fan_in) ** 0.5
      params[name] = std * jax.random.truncated_normal(key_k, -2.0, 2.0, shape)
  return params


def inverted_residual(x, skip_input, layer, *, train, activation, conv_impl, bn_eps):
  """One block: 1x1 expand + BN + act, 3x3 depthwise + BN + act, [SE], 1x1 project + BN, add.

  skip_input: the input adapter's output when blocks also see it (paper Table 6), else None.
  layer: the layer's (params, bn_params, bn_stats), with bn_params {name: {"scale", "bias"}}
  and bn_stats {name: {"mean", "var"}} (moving statistics).
  Returns the block output and, in training, the batch statistics of each BN (else None).
  """
  params, bn_params, bn_stats = layer
  batch_stats = {}

  def norm_act(h, name, act=activation):
    """BN followed by `act` (None: no activation)."""
    scale, bias = bn_params[name]["scale"], bn_params[name]["bias"]
    if train:
      fuse = act is nn.relu and ops.FUSE_BN_RELU
      h, mean, var = ops.batch_norm_train(h, scale, bias, bn_eps, relu=fuse)
      batch_stats[name] = {"mean": mean, "var": var}
      return h if fuse or act is None else act(h)
    stats = bn_stats[name]
    h = ops.batch_norm_eval(h, scale, bias, stats["mean"], stats["var"], bn_eps)
    return h if act is None else act(h)

  block_input = x if skip_input is None else jnp.concatenate([x, skip_input], axis=-1)
  h = norm_act(ops.conv1x1(block_input, params["expand_kernel"]), "expand")
  h = norm_act(ops.depthwise_conv3x3(h, params["depthwise_kernel"], conv_impl), "depthwise")
  if "se_reduce_kernel" in params:
    h = h * _squeeze_excite(h, params, activation)
  h = norm_act(ops.conv1x1(h, params["project_kernel"]), "project", None)
  return x + h, (batch_stats if train else None)


def _squeeze_excite(h, params, activation):
  """The SE gate [N, 1, 1, E]; its kernels are [E, S] and [S, E], or with a leading N axis
  when every example has its own (routing='example'), and so are the biases."""
  pooled = jnp.mean(h, axis=(1, 2))
  squeezed = activation(_dense(pooled, params["se_reduce_kernel"]) + params["se_reduce_bias"])
  gate = jax.nn.hard_sigmoid(_dense(squeezed, params["se_expand_kernel"])
                             + params["se_expand_bias"])
  return gate[:, None, None, :]


def _dense(x, kernel):
  """x [N, D] times a shared kernel [D, F] or a per-example one [N, D, F]."""
  return x @ kernel if kernel.ndim == 2 else jnp.einsum("nd,ndf->nf", x, kernel)
