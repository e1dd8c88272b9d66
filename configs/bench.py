"""Fixed workloads for timing the SiD iteration: python -m sid_jax.bench --config=configs/bench.py:A

Three small DDPM++ SongUNets with a random teacher (teacher type 'random': no files, for timing
only); generator and fake score start as copies of the teacher. The step is the full SiD
iteration (fake-score step, generator step, EMA), one accumulation round, float32.

| arg | images   | model_channels | channel_mult | blocks | attention | classes | batch |
|-----|----------|----------------|--------------|--------|-----------|---------|-------|
| A   | 32x32x3  | 32             | [2, 2, 2]    | 2      | 16x16     | 0       | 8     |
| B   | 32x32x3  | 64             | [2, 2, 2]    | 2      | 16x16     | 0       | 8     |
| C   | 8x8x1    | 32             | [1, 2]       | 1      | 4x4       | 10      | 64    |

No dropout and no augmentation, so that timings depend on the network and the batch alone.
"""

from sid_jax import config_base

# name: (resolution, channels, label_dim, batch, network kwargs beyond _DDPMPP).
WORKLOADS = {
    "A": (32, 3, 0, 8, dict(model_channels=32, channel_mult=[2, 2, 2], num_blocks=2,
                            attn_resolutions=[16])),
    "B": (32, 3, 0, 8, dict(model_channels=64, channel_mult=[2, 2, 2], num_blocks=2,
                            attn_resolutions=[16])),
    "C": (8, 1, 10, 64, dict(model_channels=32, channel_mult=[1, 2], num_blocks=1,
                             attn_resolutions=[4])),
}

# EDM's DDPM++ network (as in configs/sid_edm.py), without dropout and augmentation.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
               decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
               dropout=0.0)


def get_config(arg=None):
  name = (arg or "").strip()
  if name not in WORKLOADS:
    raise ValueError(f"configs/bench.py needs one of {sorted(WORKLOADS)} after the colon, "
                     f"got {arg!r}.")
  resolution, channels, label_dim, batch, arch = WORKLOADS[name]
  c = config_base.base_config()
  c.data.resolution = resolution
  c.data.channels = channels
  c.data.label_dim = label_dim

  c.teacher.type = "random"
  c.teacher.random_seed = 0
  c.model.init_from = "teacher"
  c.model.class_name = "EDMPrecond"
  c.model.kwargs = dict(_DDPMPP, **arch)

  c.training.global_batch = batch
  c.training.micro_batch = batch
  c.training.num_steps = 10
  c.eval.kind = "none"
  c.eval.batch = batch
  c.eval.num_samples = batch
  return c
