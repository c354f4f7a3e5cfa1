"""Built-in diffusion step-distillation methods (registered through the ``stillroom`` entry point).

One file per method: ``progressive`` (Salimans & Ho 2022), ``consistency`` (LCM, Hyper-SD segments),
``dmd2`` (Yin et al. 2024), ``vsd`` (SwiftBrush + SNOOPI). Every student can use the ``hybrid`` sampler
(Gandikota & Bau 2025) through ``student.hybrid_teacher_steps``; see ``stillroom.core.generator``.
"""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from stillroom.plugins.diffusion.consistency import Consistency
    from stillroom.plugins.diffusion.dmd2 import DMD2
    from stillroom.plugins.diffusion.progressive import Progressive
    from stillroom.plugins.diffusion.vsd import VSD

    for method in (Progressive, Consistency, DMD2, VSD):
        register(method)
