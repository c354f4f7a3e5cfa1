"""Built-in diffusion step-distillation methods (registered through the ``stillroom`` entry point).

One file per method: ``progressive`` (Salimans & Ho 2022), ``consistency`` (LCM, Hyper-SD segments),
``dmd2`` (Yin et al. 2024), ``vsd`` (SwiftBrush + SNOOPI). Every student can use the ``hybrid`` sampler
(Gandikota & Bau 2025) through ``student.hybrid_teacher_steps``; see ``stillroom.plugins.diffusion.sampler``.
"""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_families(register):
    from stillroom.plugins.diffusion.family import GeneratorFamily

    register(GeneratorFamily)


@hookimpl
def register_metrics(register):
    def fid_like(model, job, settings, out):
        """FID-like, class accuracy, diversity and recall of a loaded generator's samples."""
        from stillroom.plugins.diffusion.bench import fid_like as measure

        return measure(model, job, settings, out)

    register("fid_like", fid_like)


@hookimpl
def register_methods(register):
    from stillroom.plugins.diffusion.methods.agd import AGD
    from stillroom.plugins.diffusion.methods.boot import BOOT
    from stillroom.plugins.diffusion.methods.consistency import Consistency
    from stillroom.plugins.diffusion.methods.distill_dpo import DistillDPO
    from stillroom.plugins.diffusion.methods.dmd2 import DMD2
    from stillroom.plugins.diffusion.methods.flow_map import FlowMap
    from stillroom.plugins.diffusion.methods.mdt import MDT
    from stillroom.plugins.diffusion.methods.phased_dmd import PhasedDMD
    from stillroom.plugins.diffusion.methods.progressive import Progressive
    from stillroom.plugins.diffusion.methods.tbcm import TBCM
    from stillroom.plugins.diffusion.methods.vsd import VSD

    for method in (Progressive, Consistency, DMD2, VSD, AGD, PhasedDMD, FlowMap, MDT, BOOT, TBCM, DistillDPO):
        register(method)


@hookimpl
def register_exporters(register):
    def diffusers_folder(src, out, **options):
        """A diffusers pipeline folder (``DiffusionPipeline.from_pretrained``) of a generator student."""
        from stillroom.plugins.diffusion.export_diffusers import export_diffusers

        return export_diffusers(src, out, **options)

    register("diffusers", diffusers_folder)
