"""Numeric config fields: the interval a value must lie in, and the one check of a value
against it, shared by the trainer's validation and the model spec (which owns its fields)."""
import math

INF = float("inf")


def check_number(field, value, interval):
  """Raises a ValueError naming `field` (e.g. "config.model.bn_eps") unless `value` is a finite
  number in `interval` = (low, high, low included, high included). A NaN learning rate or a
  negative final learning-rate fraction would otherwise train on garbage with exit code 0."""
  low, high, low_in, high_in = interval
  allowed = (f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
             .replace("inf", "infinity"))
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{field} must be a finite number in {allowed}, got {value!r}")
  if not ((low <= value if low_in else low < value) and
          (value <= high if high_in else value < high)):
    raise ValueError(f"{field} must be in {allowed}, got {value!r}")


def check_positive_integer(field, value):
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{field} must be a positive integer, got {value!r}")
