"""The shape of a model signature (paper §4.2, App. B): the sequence of templates its layers
use, e.g. the hardened arg-max of each layer's mixture weights.

The paper reports that learned signatures "tend to repeat the same modules in contiguous
uninterrupted sequences and the number of repetitions grows towards the end of the model", and
calls that pattern progressive. Here:
  runs         the maximal blocks of consecutive layers with one template: 1,1,2,2,2 -> (1,2),
               (2,3);
  contiguous   no template comes back after another one took over (every template's layers
               form one run): 1,1,2,2,3 is, 1,2,1 is not;
  progressive  contiguous, and the run lengths never shrink along the depth: 1,2,2,3,3,3 is,
               1,1,2 is not.
"""


def runs(signature):
  """[(template, length)] of the maximal runs of equal consecutive entries of `signature`."""
  blocks = []
  for template in signature:
    if blocks and blocks[-1][0] == template:
      blocks[-1] = (template, blocks[-1][1] + 1)
    else:
      blocks.append((template, 1))
  return blocks


def is_contiguous(signature):
  templates = [template for template, _ in runs(signature)]
  return len(templates) == len(set(templates))


def is_progressive(signature):
  lengths = [length for _, length in runs(signature)]
  return is_contiguous(signature) and all(a <= b for a, b in zip(lengths, lengths[1:]))
