"""Classifier distillation methods, one per file: ``classifier_kd`` (Hinton et al. 2015) and ``lelp``
(Loo et al. 2024, pseudo-subclasses from linear projections of the teacher's embeddings)."""
