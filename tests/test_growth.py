"""Growing a trained model by templates (finetune/growth.py) and shipping a fine-tuned task as a
delta (finetune/deltas.py). The grown run starts from the session's two-domain model (2
templates), adds a third for the UCI digits and writes its delta: the checkpoint's tasks
compute exactly what they computed, only the added template trains, and the base plus the
delta is that run's model bit for bit."""
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compmod_jax.finetune import deltas, growth, init_from, pretrained
from compmod_jax.models import network_spec, templates
from compmod_jax.train import loop, start
from configs import digits_transfer
from helpers import built_once_per_run, flat_host, read_checkpoint, with_fields

SOURCES = ("mnist", "mnist_blur")
NEW = "uci_digits"
BASE_TEMPLATES = 2  # configs/common.py:digits_multitask, tiny


def grown_config(data_dir, base, **overrides):
  """configs/digits_transfer.py:tiny from `base` with one template added and its delta saved."""
  config = digits_transfer.get_config("tiny=1")
  config.data.data_dir = str(data_dir)
  config.eval_batch_size = 200
  config.init_from = str(base)
  config.xi_init = "source:mnist"
  config.trainable = "xi_head_bn_templates"
  config.save_delta = True
  return with_fields(config, **{"model.num_templates": BASE_TEMPLATES + 1,
                                "transfer.add_templates": 1, **overrides})


@pytest.fixture(scope="module")
def grown_workdir(embedded_dir, source_workdir, tmp_path_factory):
  """The grown run (4 steps, checkpoints at 2 and 4), once per test run."""
  def build(workdir):
    loop.train_and_evaluate(grown_config(embedded_dir, source_workdir), str(workdir))
  return built_once_per_run(tmp_path_factory, "grown", build)



def logits_of(variables, tasks, config, images):
  model = start.model_for(config, tasks)
  return {task: model.apply(variables, images, task=task) for task in tasks}


def test_grown_bank_gives_the_new_templates_exactly_zero_weight_in_the_old_tasks():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
  bank = {"kernel": rng.normal(size=(4, 5, 6)).astype(np.float32),
          "bn": {"scale": np.ones((4, 6), np.float32)}}
  variables = {"params": {"mixture_logits": logits, "templates": bank}, "batch_stats": {}}
  config = grown_config("", "base", **{"transfer.add_templates": 2,
                                       "transfer.new_templates": "copies"})
  grown, info = growth.grown(config, variables, fresh_templates=None)
  xi = np.asarray(templates.mixture_weights(grown["params"]["mixture_logits"]))
  assert xi.shape == (2, 3, 6)
  np.testing.assert_array_equal(xi[..., 4:], 0.0)
  np.testing.assert_allclose(xi[..., :4], templates.mixture_weights(logits), rtol=1e-6)
  usage = templates.template_usage({"mixture_logits": logits})
  most_used = np.argsort(-usage, kind="stable")[:2]
  assert info["copied_from"] == [int(t) + 1 for t in most_used]
  kernels = grown["params"]["templates"]["kernel"]
  np.testing.assert_array_equal(kernels[:4], bank["kernel"])
  for new, source in zip(kernels[4:], bank["kernel"][most_used]):
    noise = new - source
    assert 0 < np.std(noise) < 0.02 * np.std(source)  # new_templates_noise = 0.01
  np.testing.assert_array_equal(grown["params"]["templates"]["bn"]["scale"], 1.0)  # std 0

  spec = start.model_for(config, {"a": 10, "b": 10}).spec
  shared = growth.with_new_template_share(grown, spec, "b", 2)
  new_xi = np.asarray(templates.mixture_weights(shared["params"]["mixture_logits"]))
  np.testing.assert_allclose(new_xi[1, :, 4:], 1 / 6, rtol=1e-6)
  np.testing.assert_allclose(new_xi[1, :, :4], xi[1, :, :4] * 4 / 6, rtol=1e-5)
  np.testing.assert_array_equal(shared["params"]["mixture_logits"][0],
                                grown["params"]["mixture_logits"][0])


def test_growth_with_shared_layers_gives_the_new_template_zero_weight_there_for_every_task():
  """model.shared_mixture_layers = 1: the first layer's xi, which all tasks share, gets weight
  exactly 0 on the added template, for the old tasks and for the new one."""
  rng = np.random.default_rng(1)
  own = rng.normal(size=(2, 2, 3)).astype(np.float32)  # tasks a, b; layers 2-3; K = 3
  shared = rng.normal(size=(1, 3)).astype(np.float32)  # layer 1
  params = {"mixture_logits": own, "shared_mixture_logits": shared,
            "templates": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)}}
  config = grown_config("", "base", **{"model.num_layers": 3, "model.num_templates": 4,
                                       "model.shared_mixture_layers": 1})
  grown, _ = growth.grown(config, {"params": params, "batch_stats": {}},
                          fresh_templates={"kernel": np.zeros((4, 4, 5), np.float32)})
  spec = start.model_for(config, {"a": 10, "b": 10}).spec
  new_task = growth.with_new_template_share(grown, spec, "b", 1)
  before = np.asarray(templates.mixture_weights(templates.task_mixture_logits(params)))
  for variables in (grown, new_task):
    xi = np.asarray(templates.mixture_weights(
        templates.task_mixture_logits(variables["params"])))
    assert xi.shape == (2, 3, 4)
    np.testing.assert_array_equal(xi[:, 0, 3], 0.0)  # the shared layer, every task
    np.testing.assert_allclose(xi[:, 0, :3], before[:, 0], rtol=1e-6)
    np.testing.assert_array_equal(xi[0, :, 3], 0.0)  # the old task a, every layer
  np.testing.assert_allclose(xi[1, 1:, 3], 1 / 4, rtol=1e-6)  # the new task's own layers
  np.testing.assert_allclose(xi[1, 1:, :3], before[1, 1:] * 3 / 4, rtol=1e-5)


def test_adding_a_template_leaves_the_checkpoints_tasks_exact_and_trains_the_new_one(
    grown_workdir, source_workdir, embedded_dir):
  base, grown = pretrained.load(str(source_workdir)), pretrained.load(str(grown_workdir))
  _, halfway = read_checkpoint(str(grown_workdir), step=2)
  old, new, mid = (flat_host(base.variables["params"]), flat_host(grown.variables["params"]),
                   flat_host(halfway["state"]["ema_params"]))
  for path, value in old.items():
    if path.startswith("templates/"):
      np.testing.assert_array_equal(new[path][:BASE_TEMPLATES], value, err_msg=path)
      assert not np.array_equal(new[path][BASE_TEMPLATES:], mid[path][BASE_TEMPLATES:]), path
    elif path == "mixture_logits":
      np.testing.assert_array_equal(new[path][[0, 1], :, :BASE_TEMPLATES], value)
      np.testing.assert_array_equal(new[path][[0, 1], :, BASE_TEMPLATES:],
                                    growth.NEW_TEMPLATE_LOGIT)
    elif not path.startswith("mixture_logits") and "block_bn" not in path:
      np.testing.assert_array_equal(new[path], value, err_msg=path)  # adapters, old heads
  config = grown_config(embedded_dir, source_workdir)
  images = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
  before = logits_of(base.variables, dict(base.tasks), with_fields(
      grown_config(embedded_dir, source_workdir), **{"model.num_templates": 2}), images)
  after = logits_of(grown.variables, dict(grown.tasks), config, images)
  for task in SOURCES:
    # Bit-identical: the new template's weight is exactly 0, so every sum over templates adds
    # exact zeros to the same terms.
    np.testing.assert_array_equal(after[task], before[task], err_msg=task)
  xi = templates.mixture_weights(jnp.asarray(new["mixture_logits"]))
  row = sorted(grown.tasks).index(NEW)
  assert float(jnp.min(xi[row, :, BASE_TEMPLATES])) > 0.05  # the new task uses it


def test_the_new_task_starts_with_a_uniform_share_of_the_added_template(grown_workdir):
  _, checkpoint = read_checkpoint(str(grown_workdir))
  run_info = checkpoint["meta"]["run_info"]
  assert run_info["added_templates"]["added"] == 1
  bank = pretrained.load(str(grown_workdir)).variables["params"]["templates"]
  assert run_info["added_templates"]["parameters"] == sum(
      rows[0].size for rows in jax.tree.leaves(bank))
  initial_xi = np.array(run_info["new_tasks"][NEW]["initial_xi"])
  np.testing.assert_allclose(initial_xi[:, BASE_TEMPLATES], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(initial_xi.sum(-1), 1.0, rtol=1e-5)


def test_base_plus_delta_is_the_fine_tuned_model_bit_for_bit(grown_workdir, source_workdir,
                                                             embedded_dir):
  delta_dir = grown_workdir / "delta"
  config = grown_config(embedded_dir, source_workdir, save_delta=False,
                        deltas=(str(delta_dir),), **{"transfer.add_templates": 0})
  rebuilt = init_from.pretrained_source(config)
  trained = pretrained.load(str(grown_workdir))
  assert rebuilt.tasks == trained.tasks
  expected, actual = flat_host(trained.variables), flat_host(rebuilt.variables)
  assert sorted(actual) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(actual[path], value, err_msg=path)
  # Every task's predictions, as the trainer would compute them from the rebuilt model.
  images = jax.random.uniform(jax.random.key(3), (8, 28, 28, 1))
  tasks = dict(trained.tasks)
  for task, logits in logits_of(rebuilt.variables, tasks, config, images).items():
    np.testing.assert_array_equal(
        logits, logits_of(trained.variables, tasks, config, images)[task])
  info = deltas.read(delta_dir).info
  full_bytes = sum(f.stat().st_size for f in (grown_workdir / "checkpoints" / "4").rglob("*")
                   if f.is_file())
  assert info["tasks"] == {NEW: 10} and info["added_templates"] == 1
  assert info["bytes"] < info["model_bytes"] / 2 < full_bytes


def test_a_delta_against_another_base_or_damaged_is_refused(grown_workdir, source_workdir,
                                                            embedded_dir, tmp_path):
  step_30 = source_workdir / "checkpoints" / "30"  # the same run, earlier: other templates
  config = grown_config(embedded_dir, step_30, save_delta=False,
                        deltas=(str(grown_workdir / "delta"),),
                        **{"transfer.add_templates": 0})
  with pytest.raises(pretrained.PretrainedCheckpointError, match="fingerprint differs"):
    init_from.pretrained_source(config)
  damaged = tmp_path / "delta"
  shutil.copytree(grown_workdir / "delta", damaged)
  payload = bytearray((damaged / "delta.npz").read_bytes())
  payload[-100] ^= 1
  (damaged / "delta.npz").write_bytes(bytes(payload))
  config = grown_config(embedded_dir, source_workdir, deltas=(str(damaged),),
                        **{"transfer.add_templates": 0})
  with pytest.raises(pretrained.PretrainedCheckpointError, match="checksum"):
    init_from.pretrained_source(config)


@pytest.mark.parametrize("overrides, message", [
    ({"init_from": ""}, "add_templates=1 grows a trained model"),
    ({"transfer.new_templates": "clones"}, "new_templates must be one of"),
    ({"model.signature": "sequential"}, "add_templates needs mixture weights"),
    ({"transfer.add_templates": 0, "init_from": "", "trainable": ""},
     "save_delta=True writes what a run changed"),
])
def test_growth_and_delta_config_mistakes_fail_before_any_work(overrides, message, embedded_dir,
                                                               tmp_path, no_heavy_work):
  config = grown_config(embedded_dir, tmp_path / "unread", **overrides)
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_templates": 2}, "model needs config.model.num_templates=3"),
    ({"transfer.add_templates": 0, "deltas": ("nowhere/delta",)}, "holds no delta.json"),
])
def test_a_model_or_delta_that_does_not_fit_the_checkpoint_fails_before_any_work(
    overrides, message, embedded_dir, source_workdir, tmp_path, no_heavy_work):
  # source_workdir is session-scoped, so it is built before no_heavy_work applies.
  config = grown_config(embedded_dir, source_workdir, **overrides)
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_deltas_of_two_new_tasks_made_against_one_base_apply_together(source_workdir,
                                                                       embedded_dir, tmp_path):
  base = pretrained.load(str(source_workdir))
  config = with_fields(grown_config(embedded_dir, source_workdir),
                       **{"model.num_templates": BASE_TEMPLATES})
  finals = {}
  for seed, task in enumerate(("a_task", "b_task")):
    tasks = {**base.tasks, task: 10}
    model = start.model_for(config, tasks)
    fresh = jax.device_get(model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1))))
    final, _ = pretrained.merge(fresh, base.variables, model.spec, sorted(base.tasks))
    finals[task] = (model.spec, final)  # the new task's fresh rows stand for trained ones
    run = types.SimpleNamespace(
        workdir=str(tmp_path / task), model=model, config=types.SimpleNamespace(tasks={task: 0}),
        method=types.SimpleNamespace(own_params=""))
    deltas.save(run, types.SimpleNamespace(ema_params=final["params"],
                                           batch_stats=final["batch_stats"]), base)
  both = deltas.with_deltas(base, [str(tmp_path / task / "delta") for task in finals])
  assert both.tasks == {**base.tasks, "a_task": 10, "b_task": 10}
  names = sorted(both.tasks)
  combined = flat_host(both.variables)
  for task, (spec, final) in finals.items():
    for path, value in flat_host(final).items():
      owners = network_spec.task_owners(spec, path)
      if owners is None or len(owners) == 1:
        np.testing.assert_array_equal(combined[path], value, err_msg=path)  # shared, heads
      else:
        for row, owner in enumerate(owners):  # every task's row where the model puts it
          np.testing.assert_array_equal(combined[path][names.index(owner)], value[row],
                                        err_msg=f"{path} {owner}")
