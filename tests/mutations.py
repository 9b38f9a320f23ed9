"""Checks that the test suite can fail where its tests promise: applies one-line mutations of
the source, one at a time, to a copy of the repository, and runs the tests named for each.

  python tests/mutations.py               # every mutation (about half an hour on 2 cores)
  python tests/mutations.py --only=ema    # the mutations whose name contains "ema"

Each mutation must make at least one test of the README's test command fail; the script prints
the tests that failed, and exits 1 if any mutation survived. The working tree is never touched:
the copy lives in a temporary folder, and pytest runs there (the copy's `compmod_jax` is first on
the import path). docs/tests.md lists the last run.
"""
import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
COPIED = ("compmod_jax", "configs", "tests", "pytest.ini", "setup.py")

# The node id prefix of the content-routing tests, for mutations that one test catches.
T_ROUTING = "tests/test_content_routing.py::"
T_POOLED_LOSS = (T_ROUTING + "test_the_supervised_loss_runs_every_tasks_images_through_a_task_"
                 "free_model_together")
# name: (file, the line as it is, the mutated line, the test files to run)
MUTATIONS = {
    "bn re-estimation sums instead of averaging": (
        "compmod_jax/finetune/transfer.py",
        "_with_row(all_tasks, row, summed / num_batches)", "_with_row(all_tasks, row, summed)",
        ("tests/test_transfer.py",)),
    "the loop does not save when asked to stop": (
        "compmod_jax/train/loop.py",
        "if step % config.checkpoint_every == 0 or last or stopping:",
        "if step % config.checkpoint_every == 0 or last:", ("tests/test_precision.py",)),
    "surgery harden writes fresh EMA parameters": (
        "compmod_jax/finetune/surgery.py",
        'ema_params=ctx.replicated(variables["params"]),', "ema_params=state.ema_params,",
        ("tests/test_surgery.py",)),
    "joint adaptation reads the target's labels": (
        "compmod_jax/methods/adaptation.py",
        "sources = {task: examples for task, examples in batch.items() if task != self.target}",
        "sources = dict(batch)", ("tests/test_adaptation.py",)),
    "ema updates frozen rows": (
        "compmod_jax/train/steps.py",
        "ema = keep_frozen(optim.ema_update(state.ema_params, params, config.ema_decay, "
        "state.step),",
        "ema = (lambda new, old: new)(optim.ema_update(state.ema_params, params, "
        "config.ema_decay, state.step),",
        ("tests/test_transfer.py", "tests/test_growth.py")),
    "bn backward drops the x_hat term": (
        "compmod_jax/models/ops.py",
        "dx = (scale * inv_std) * (dy - (dbias + x_hat * dscale) / count)",
        "dx = (scale * inv_std) * (dy - dbias / count)", ("tests/test_model.py",)),
    "a non-finite update is applied": (
        "compmod_jax/train/steps.py",
        "new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)",
        "new_state = updated", ("tests/test_reliability.py",)),
    "accuracy coefficients are not normalised": (
        "compmod_jax/finetune/transfer.py", "  return values / values.sum()\n",
        "  return values\n", ("tests/test_transfer.py",)),
    "rmsprop's mean square starts at zero": (
        "compmod_jax/train/optim.py", "initial_scale=1.0, momentum", "initial_scale=0.0, momentum",
        ("tests/test_training.py",)),
    "restored arrays are not checked against their checksums": (
        "compmod_jax/train/checkpoint.py",
        'problems = checksum_problems(meta["checksums"], array_checksums(jax.device_get(state)))',
        "problems = []", ("tests/test_reliability.py",)),
    "every process trains on the first rows of the global batch": (
        "compmod_jax/data/streams.py",
        "rows = slice(process_index * self.batch_size, (process_index + 1) * self.batch_size)",
        "rows = slice(0, self.batch_size)", ("tests/test_data.py",)),
    "a lost coordinator is reported as an unknown peer": (
        "compmod_jax/supervisor.py", '    return "coordinator"\n', '    return "unknown"\n',
        ("tests/test_reliability.py",)),
    "mnist-m test crops come from the training region": (
        "compmod_jax/data/colour_digits.py",
        "first_left, last_left = (boundary, width - side) if test else (0, boundary - side)",
        "first_left, last_left = (0, boundary - side)", ("tests/test_colour_digits.py",)),
    "mnist-m blends without the absolute value": (
        "compmod_jax/data/colour_digits.py",
        "return to_uint8(np.abs(photo - digit[..., None].astype(np.float64)))",
        "return to_uint8(photo - digit[..., None].astype(np.float64))",
        ("tests/test_colour_digits.py",)),
    "a colour domain's seed depends on the hash seed": (
        "compmod_jax/data/colour_digits.py",
        "return np.random.default_rng([zlib.crc32(domain.encode()), int(index)])",
        "return np.random.default_rng([hash(domain) % 2**32, int(index)])",
        ("tests/test_colour_digits.py",)),
    "syn_digits test seeds overlap the training seeds": (
        "compmod_jax/data/embedded_digits.py",
        "return images, labels, np.arange(len(labels)) >= SYN_DIGITS_TRAIN",
        "return images, labels, np.arange(len(labels)) % 5 == 0",
        ("tests/test_colour_digits.py",)),
    "syn_digits draws no neighbours": (
        "compmod_jax/data/colour_digits.py",
        "    if rng.random() < NEIGHBOUR_PROBABILITY:",
        "    if rng.random() < 0:", ("tests/test_colour_digits.py",)),
    "routing health reads the training weights, not the evaluated EMA ones": (
        "compmod_jax/train/report.py",
        "health = routing_health(ctx.model, routing_params(state.ema_params))",
        "health = routing_health(ctx.model, routing_params(state.params))",
        ("tests/test_routing.py",)),
    "template cosine compares biases too": (
        "compmod_jax/analysis/routing.py",
        'for name, leaf in sorted(templates.items()) if name.endswith("kernel")]',
        "for name, leaf in sorted(templates.items())]", ("tests/test_routing.py",)),
    "the mutual information is the mean entropy minus the entropy of the mean": (
        "compmod_jax/analysis/routing.py",
        '"mutual_information": entropy_of_mean - mean_entropy,',
        '"mutual_information": mean_entropy - entropy_of_mean,', ("tests/test_routing.py",)),
    "the router reads nothing of the example": (
        "compmod_jax/models/network.py",
        "routes = templates.mixture_weights(logits + pooled @ router_kernel)  # [N, K]",
        "routes = templates.mixture_weights(logits + 0 * pooled @ router_kernel)",
        ("tests/test_content_routing.py",)),
    "every example is routed by the first example of its batch": (
        "compmod_jax/models/network.py", "pooled = ops.at_least_float32(jnp.mean(h, axis=(1, 2)))",
        "pooled = ops.at_least_float32(jnp.mean(h[:1], axis=(1, 2)))",
        ("tests/test_content_routing.py",)),
    "every layer reads the first layer's router": (
        "compmod_jax/models/network.py",
        'return routed, (layer_logits, self.router["kernel"], self._layer_bn(task_index), stats)',
        'return routed, (layer_logits, jnp.broadcast_to(self.router["kernel"][:1], '
        'self.router["kernel"].shape), self._layer_bn(task_index), stats)',
        ("tests/test_content_routing.py",)),
    "a per-example depthwise kernel is read transposed": (
        "compmod_jax/models/ops.py",
        "taps = jnp.transpose(kernel, (1, 2, 0, 3))[:, :, :, None, None, :]  # [3, 3, N, 1, 1, C]",
        "taps = jnp.transpose(kernel, (2, 1, 0, 3))[:, :, :, None, None, :]",
        ("tests/test_content_routing.py",)),
    "the posterior's variance forgets the spread of the tasks' means": (
        "compmod_jax/models/network.py",
        'spread = stats["var"][:, :, None] + jnp.square(stats["mean"][:, :, None] - mean)',
        'spread = stats["var"][:, :, None] + 0 * mean', ("tests/test_content_routing.py",)),
    "the domain classifier learns every image as the first task": (
        "compmod_jax/models/network.py",
        "jax.nn.logsumexp(domain_logits, -1) - domain_logits[:, task_index]))",
        "jax.nn.logsumexp(domain_logits, -1) - domain_logits[:, 0]))",
        ("tests/test_content_routing.py",)),
    "the domain loss reaches the input adapter": (
        "compmod_jax/models/network.py",
        "pooled = jax.lax.stop_gradient(ops.at_least_float32(jnp.mean(x, axis=(1, 2))))",
        "pooled = ops.at_least_float32(jnp.mean(x, axis=(1, 2)))",
        ("tests/test_content_routing.py",)),
    "the domain accuracy counts padding": (
        "compmod_jax/train/steps.py",
        "sums[\"domain_correct\"] = jnp.sum((jnp.argmax(posterior, -1) == own) * mask)",
        "sums[\"domain_correct\"] = jnp.sum(jnp.argmax(posterior, -1) == own)",
        ("tests/test_content_routing.py",)),
    "the own-domain mass reads the first task's column": (
        "compmod_jax/train/steps.py",
        "jnp.sum(posterior[:, own] * mask)",
        "jnp.sum(posterior[:, 0] * mask)",
        (T_ROUTING + "test_the_own_domain_mass_is_the_mean_posterior_of_the_task_over_real_"
         "images",)),
    "a task_free model runs each task's images through it apart": (
        "compmod_jax/methods/supervised.py",
        "loss = pooled_classification_loss if spec.task_free else classification_loss",
        "loss = classification_loss",
        (T_POOLED_LOSS,)),
    "a task_free model reads the task's row": (
        "compmod_jax/models/network_spec.py",
        "return 0 if self.task_free else names.index(task)",
        "return names.index(task)",
        (T_ROUTING + "test_a_task_free_model_is_one_network_whatever_task_it_is_given",)),
    "a task_free loss weighs every task alike": (
        "compmod_jax/methods/supervised.py",
        "    total = total + task_weights[task] * loss\n    metrics[f\"{task}/loss\"] = loss\n"
        "  return total, (updates",
        "    total = total + loss\n    metrics[f\"{task}/loss\"] = loss\n  return total, (updates",
        (T_POOLED_LOSS,)),
    "a content-routed model's mean entropy is the entropy of each task's mean route": (
        "compmod_jax/analysis/routing.py", "  if route_entropy is None:", "  if True:",
        ("tests/test_routing.py",)),
    "streams autotune (a finished run waits for the tuning thread before it exits)": (
        "compmod_jax/data/streams.py", "options.autotune.enabled = False",
        "options.autotune.enabled = True", ("tests/test_data.py",)),
}


def failed_tests(copy, path, before, after, tests):
  """The tests that fail with `before` replaced by `after` in `path` of the copy."""
  source = copy / path
  original = source.read_text()
  if original.count(before) != 1:
    raise SystemExit(f"{path} no longer holds exactly one {before!r}: update MUTATIONS.")
  source.write_text(original.replace(before, after))
  try:
    output = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *tests], cwd=copy, capture_output=True, text=True).stdout
  finally:
    source.write_text(original)
  return [line.split()[1] for line in output.splitlines()
          if line.startswith(("FAILED", "ERROR"))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="run the mutations whose name contains this")
  chosen = {name: m for name, m in MUTATIONS.items() if parser.parse_args().only in name}
  survived = []
  with tempfile.TemporaryDirectory() as folder:
    copy = pathlib.Path(folder)
    for name in COPIED:
      source = REPO / name
      if source.is_dir():
        shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
      else:
        shutil.copy(source, copy / name)
    for name, (path, before, after, tests) in chosen.items():
      failed = failed_tests(copy, path, before, after, tests)
      print(f"{name} ({path}): {len(failed)} failed" + "".join(f"\n    {t}" for t in failed),
            flush=True)
      if not failed:
        survived.append(name)
  if survived:
    print(f"survived: {survived}")
    sys.exit(1)


if __name__ == "__main__":
  main()
