"""Built-in image-classifier family: distils a CNN classifier (default: the shipped MNIST classifier)
into smaller CNNs built from config; methods ``classifier_kd`` (Hinton et al. 2015) and ``lelp``
(Loo et al. 2024), one file each under ``methods/``; the ``accuracy`` metric (accuracy and ECE)."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_families(register):
    from stillroom.plugins.classifier.family import ClassifierFamily

    register(ClassifierFamily)


@hookimpl
def register_metrics(register):
    def accuracy(model, job, settings, out):
        """Top-1 accuracy and expected calibration error of a loaded classifier on held-out images."""
        from stillroom.plugins.classifier.bench import accuracy as measure

        return measure(model, job, settings, out)

    register("accuracy", accuracy)


@hookimpl
def register_methods(register):
    from stillroom.plugins.classifier.methods.kd import ClassifierKD
    from stillroom.plugins.classifier.methods.lelp import LELP

    for method in (ClassifierKD, LELP):
        register(method)
