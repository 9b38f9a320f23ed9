"""Routing health (analysis/routing.py): the statistics against their definitions, the
warnings, and what a run writes of them."""
import json
import logging

import numpy as np

from compmod_jax.analysis import routing, tables
from compmod_jax.train import loop
from helpers import tiny_digits

LN2 = np.log(2.0)


def test_route_statistics_follow_their_definitions():
  routes = np.array([  # 2 routes (tasks), 3 layers, K = 2
      [[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]],
      [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]])
  stats = routing.route_statistics(routes)
  np.testing.assert_array_equal(stats["usage"], [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
  # Layer 1: each task certain of a different template, so the route tells the task: I = ln 2.
  # Layer 2: both tasks spread alike, I = 0. Layer 3: one template for all, nothing spread.
  np.testing.assert_allclose(stats["entropy_of_mean"], [LN2, LN2, 0.0], rtol=0, atol=1e-15)
  np.testing.assert_allclose(stats["mean_entropy"], [0.0, LN2, 0.0], rtol=0, atol=1e-15)
  np.testing.assert_allclose(stats["mutual_information"], [LN2, 0.0, 0.0], rtol=0, atol=1e-15)
  np.testing.assert_allclose(stats["balance"], [1.0, 1.0, 0.5], rtol=1e-15)


def test_mutual_information_is_the_jensen_gap_and_never_negative():
  routes = np.random.default_rng(0).dirichlet(np.full(4, 0.3), size=(5, 6))  # [R, L, K]
  stats = routing.route_statistics(routes)
  entropy = lambda p: -np.sum(p * np.log(p), axis=-1)
  np.testing.assert_allclose(stats["mutual_information"],
                             entropy(routes.mean(0)) - entropy(routes).mean(0), rtol=1e-12)
  assert np.all(stats["mutual_information"] > 0)


def bank(kernels, biases):
  """A params["templates"] tree of K templates: one conv kernel and one bias leaf."""
  return {"expand_kernel": np.asarray(kernels, np.float32),
          "se_expand_bias": np.asarray(biases, np.float32)}


def test_template_cosine_compares_kernels_only():
  templates = bank(kernels=[[[1.0, 2.0]], [[3.0, 6.0]], [[2.0, -1.0]]],
                   biases=[[5.0], [-7.0], [0.0]])
  cosine = routing.template_cosine(templates)
  # Templates 1 and 2: the same kernel direction, opposite biases (which are not kernels).
  np.testing.assert_allclose(cosine, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)


def test_warnings_name_the_unused_and_the_collapsed_templates():
  templates = bank(kernels=[[[1.0, 2.0]], [[3.0, 6.0]], [[2.0, -1.0]]], biases=[[0], [0], [0]])
  uneven = {"a": np.array([[0.6, 0.395, 0.005]] * 2), "b": np.array([[0.5, 0.5, 0.0]] * 2)}
  health = routing.health(uneven, templates)
  assert health["warnings"] == [
      "template 3 is unused: it carries 0.25% of the mixture weight over tasks and layers (a "
      "uniform share is 33.33%)",
      "templates 1 and 2 have collapsed into one: their kernels' cosine similarity is 1.000"]
  assert health["max_template_cosine"] > 0.999
  distinct = bank(kernels=[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]], biases=[[0], [0], [0]])
  even = {"a": np.full((2, 3), 1 / 3)}
  health = routing.health(even, distinct)
  assert health["warnings"] == [] and np.isclose(health["max_template_cosine"], 0.5 ** 0.5)


def test_a_runs_results_hold_the_routing_of_its_evaluated_weights(source_workdir):
  health = json.loads((source_workdir / "results.json").read_text())["routing"]
  xi = tables.run_mixture_weights(source_workdir)  # the newest checkpoint's EMA weights
  assert sorted(xi) == ["mnist", "mnist_blur"]
  expected = routing.route_statistics(np.stack([xi["mnist"], xi["mnist_blur"]]))
  for key, value in expected.items():
    np.testing.assert_allclose(health[key], value, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(health["template_usage"], expected["usage"].mean(0), rtol=1e-6)


def test_a_run_with_an_unused_template_says_so_in_its_log(embedded_dir, tmp_path, caplog):
  # An explicit signature that never picks template 2, 2 layers (a quicker compile), 1 step.
  config = tiny_digits(embedded_dir, **{"model.signature": "explicit", "model.num_layers": 2,
                                        "model.explicit_signature": "1,1",
                                        "total_steps": 1, "eval_every": 1})
  with caplog.at_level(logging.WARNING):
    results = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["routing"]["template_usage"] == [1.0, 0.0]
  said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Routing")]
  assert said == ["Routing at step 1: template 2 is unused: it carries 0.00% of the mixture "
                  "weight over tasks and layers (a uniform share is 50.00%)."]


def test_grouped_routes_give_the_statistics_of_every_example():
  """routing='example': each task hands over its images' mean route and mean route entropy;
  with equal-sized tasks that is the statistics of all the images' own routes."""
  routes = np.random.default_rng(1).dirichlet(np.full(3, 0.5), size=(2, 5, 4))  # [T, N, L, K]
  entropy = lambda p: -np.sum(p * np.log(p), axis=-1)
  grouped = routing.route_statistics(routes.mean(axis=1), entropy(routes).mean(axis=1))
  every = routing.route_statistics(routes.reshape(10, 4, 3))
  for key, value in every.items():
    np.testing.assert_allclose(grouped[key], value, rtol=1e-12, err_msg=key)
  ungrouped = routing.route_statistics(routes.mean(axis=1))  # the entropy of the means instead
  assert np.all(ungrouped["mean_entropy"] > every["mean_entropy"])
