"""Loads a config file from configs/ the way --config does, with dotted overrides."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(name):
  """The config file configs/NAME as a module (for its tables, e.g. sid_lsg.py's RELEASED_KIMG)."""
  path = os.path.join(ROOT, "configs", name)
  spec = importlib.util.spec_from_file_location(f"_config_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(name, arg=None, **overrides):
  config = load_module(name).get_config(arg)
  for dotted, value in overrides.items():
    *parents, last = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return config
