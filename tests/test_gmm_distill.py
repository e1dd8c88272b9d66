"""A shortened version of configs/gmm_sid.py: SiD must actually move the generator to the teacher."""

import jax

from sid_jax import train
from tests import configs_util


def test_sid_pulls_the_generator_onto_the_mixture(tmp_path):
  config = configs_util.load("gmm_sid.py", None, **{
      "training.num_steps": 120, "training.global_batch": 64, "training.micro_batch": 64,
      "eval.num_samples": 512, "eval.batch": 256, "eval.every_steps": 1000,
      "log.sample_every_steps": 1000, "checkpoint.every_steps": 1000})
  summary = train.distill(config, str(tmp_path), devices=jax.devices()[:1])
  first, last = summary["initial_eval"], summary["final_eval"]
  # At initialisation the generator ignores its label and makes noise around zero.
  assert first["nearest_component_accuracy"] < 0.3
  assert first["frechet_distance"] > 5.0
  # After 120 SiD iterations: far closer to the true mixture, samples on the requested component.
  assert last["frechet_distance"] < first["frechet_distance"] / 3, (first, last)
  assert last["nearest_component_accuracy"] > 0.9, last
