"""Distillation methods as assemblies of the shared pieces (`base.Assembly`): each turns a
config into its teacher, students, losses and samplers; `sid_jax.run` builds the run from it.
A new method is a new module here and an entry in `ASSEMBLERS`."""

from sid_jax.methods import lsg, sid, sida
from sid_jax.methods.base import Assembly

ASSEMBLERS = {"sid": sid.assemble, "sid_lsg": lsg.assemble, "sida": sida.assemble}
# Checks of a method's own config section, run before anything is built.
CHECKS = {"sid_lsg": lsg.check_config, "sida": sida.check_config}

__all__ = ["ASSEMBLERS", "Assembly", "CHECKS"]
