"""SiD-LSG from Stable Diffusion 1.5: an alias of configs/sid_lsg.py with teacher=sd15.

  python -m sid_jax.main --config=configs/sd15_lsg.py:kappa=1.5 ... is
  python -m sid_jax.main --config=configs/sid_lsg.py:teacher=sd15,kappa=1.5 ...
"""

import importlib.util
import os


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sid_lsg.py")
  spec = importlib.util.spec_from_file_location("_config_sid_lsg", path)
  sid_lsg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sid_lsg)  # a config file, loaded as --config loads it
  return sid_lsg.get_config(arg, teacher="sd15")
