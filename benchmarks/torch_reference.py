"""The compositional isometric network and its training step in PyTorch (CPU), for
benchmarks/torch_race.py: the JAX step races this one on the same machine.

Same computation as compmod_jax.models.network with its defaults (small design, SE, ReLU,
per-layer BN in training mode, dropout before the head): a patchify input adapter; L inverted
residual blocks whose kernels and SE weights are each layer's softmax(xi_l)-weighted sum of K
templates (`mix="templates"`), or the plain network's own block per layer (`mix="plain"`); a 1x1
conv, average pool and dense output adapter; one head. Tensors are channels-last, PyTorch's
fastest CPU layout for these convolutions. The optimizer is RMSProp as in the JAX race step.

Needs `pip install torch` (not a dependency of the package).
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS_LAST = torch.channels_last


def _kernel(shape, fan_in):
  """He-normal, truncated at two standard deviations (as the JAX model initialises)."""
  std = math.sqrt(2.0 / fan_in)
  return nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std)


def block_shapes(width, expanded, squeezed):
  """One block's (or template's) parameter shapes, by name (as in compmod_jax/models/blocks)."""
  return {"expand_kernel": (width, expanded), "depthwise_kernel": (expanded, 1, 3, 3),
          "project_kernel": (expanded, width), "se_reduce_kernel": (expanded, squeezed),
          "se_reduce_bias": (squeezed,), "se_expand_kernel": (squeezed, expanded),
          "se_expand_bias": (expanded,)}


def _init_block(shapes, leading=()):
  params = {}
  for name, shape in shapes.items():
    if name.endswith("bias"):
      params[name] = torch.zeros(leading + shape)
    else:
      fan_in = 9 if name == "depthwise_kernel" else shape[0]
      params[name] = _kernel(leading + shape, fan_in)
  return nn.ParameterDict({name: nn.Parameter(value) for name, value in params.items()})


class CompositionalNet(nn.Module):

  def __init__(self, *, num_layers=8, num_templates=4, width=24, expansion=6, patch_size=4,
               input_channels=1, num_classes=10, mix="templates", dropout_rate=0.2,
               output_channels=(128, 256)):
    super().__init__()
    if mix not in ("templates", "plain"):
      raise ValueError(f"mix must be 'templates' or 'plain', got {mix!r}")
    self.num_layers, self.mix, self.patch_size = num_layers, mix, patch_size
    expanded = width * expansion
    shapes = block_shapes(width, expanded, max(1, int(expanded * 0.25)))
    if mix == "templates":
      self.templates = _init_block(shapes, (num_templates,))
      self.mixture_logits = nn.Parameter(torch.randn(num_layers, num_templates))
    else:
      self.blocks = nn.ModuleList(_init_block(shapes) for _ in range(num_layers))
    self.norms = nn.ModuleList(
        nn.ModuleList(nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
                      for c in (expanded, expanded, width)) for _ in range(num_layers))
    self.adapter = nn.Conv2d(input_channels, width, patch_size, stride=patch_size)
    nn.init.kaiming_normal_(self.adapter.weight)
    nn.init.zeros_(self.adapter.bias)
    c1, c2 = output_channels
    self.output_conv = nn.Conv2d(width, c1, 1)
    self.output_dense = nn.Linear(c1, c2)
    self.dropout = nn.Dropout(dropout_rate)
    self.head = nn.Linear(c2, num_classes)

  def layer_parameters(self):
    """Each layer's block parameters: mixed from the templates once per step (one einsum per
    parameter for all layers, as the JAX model does), or the plain blocks."""
    if self.mix == "plain":
      return list(self.blocks)
    xi = torch.softmax(self.mixture_logits, dim=-1)
    mixed = {name: torch.einsum("lk,k...->l...", xi, bank)
             for name, bank in self.templates.items()}
    return [{name: value[layer] for name, value in mixed.items()}
            for layer in range(self.num_layers)]

  def block(self, x, params, norms):
    expanded = params["expand_kernel"].shape[1]
    expand = params["expand_kernel"].t()[:, :, None, None].contiguous(memory_format=CHANNELS_LAST)
    h = F.relu(norms[0](F.conv2d(x, expand)))
    depthwise = params["depthwise_kernel"].contiguous(memory_format=CHANNELS_LAST)
    h = F.relu(norms[1](F.conv2d(h, depthwise, padding=1, groups=expanded)))
    squeezed = F.relu(h.mean((2, 3)) @ params["se_reduce_kernel"] + params["se_reduce_bias"])
    gate = F.hardsigmoid(squeezed @ params["se_expand_kernel"] + params["se_expand_bias"])
    h = h * gate[:, :, None, None]
    project = params["project_kernel"].t()[:, :, None, None].contiguous(
        memory_format=CHANNELS_LAST)
    return x + norms[2](F.conv2d(h, project))

  def forward(self, images):
    x = F.relu(self.adapter(images))
    for params, norms in zip(self.layer_parameters(), self.norms):
      x = self.block(x, params, norms)
    h = F.relu(self.output_conv(x)).mean((2, 3))
    return self.head(self.dropout(F.relu(self.output_dense(h))))


class TorchTrainStep:
  """A training step of CompositionalNet (eager, or torch.compile with compile=True) on a fixed
  random batch; `run(n)` returns seconds per step, as benchmarks/common.TrainStep.run does."""

  def __init__(self, *, batch=128, hw=28, compile=False, seed=0, **net_kwargs):
    torch.manual_seed(seed)
    self.net = CompositionalNet(**net_kwargs)
    for conv in (self.net.adapter, self.net.output_conv):  # the template banks are not 4-D
      conv.to(memory_format=CHANNELS_LAST)
    channels = net_kwargs.get("input_channels", 1)
    self.images = torch.randn(batch, channels, hw, hw).contiguous(memory_format=CHANNELS_LAST)
    self.labels = torch.randint(0, net_kwargs.get("num_classes", 10), (batch,))
    self.optimizer = torch.optim.RMSprop(self.net.parameters(), lr=0.02, alpha=0.9, eps=1e-8,
                                         foreach=True)
    self.forward = torch.compile(self.net) if compile else self.net
    started = time.perf_counter()
    self._step()
    self._step()
    self.warmup_s = time.perf_counter() - started  # torch.compile compiles here

  def _step(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(self.forward(self.images), self.labels)
    loss.backward()
    self.optimizer.step()
    return loss

  def run(self, n):
    started = time.perf_counter()
    for _ in range(n):
      loss = self._step()
    float(loss.detach())
    return (time.perf_counter() - started) / n
