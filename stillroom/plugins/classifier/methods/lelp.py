"""LELP: Linear Projections of Teacher Embeddings for few-class distillation (Loo, Iliopoulos, Hu & Vee,
Google Research 2024, arXiv:2409.20449, "Learning Embedding Linear Projections").

With few classes the teacher's C probabilities carry little of what it knows. LELP reads more out of
its penultimate embedding z(x) in R^D: every class is split into pseudo-subclasses along the main
directions in which that class's embeddings vary, and the student learns the finer C*K-way
distribution (as in subclass distillation, Mueller et al. 2020, but without retraining the teacher).
On the training split, with W in R^{C x D} the teacher's last layer:

1. null-space projection: P = I - W^+ W removes the part of z that sets the class logits, so the
   split carries what the logits do not;
2. per class c, over the projected embeddings P z of its training images: the mean mu_c and the top
   m principal directions v_(c,i) (eigenvectors of their covariance), with the standard deviation
   sigma_(c,i) of the projections on each;
3. K = 2m pseudo-subclasses per class, the two sides of each direction:
       s_(c,i,+-)(x) = +- <P z(x) - mu_c, v_(c,i)> / sigma_(c,i)
4. the teacher's subclass distribution splits its class probability by a softmax over them:
       p_T(c, j | x) = p_T(c | x) * softmax_j(s_c(x))_j,   t_(c,j) = log p_T(c | x) + log softmax_j(s_c(x))_j
5. the student's head has C*K outputs u_(c,j); its class probability is the sum over the class's
   subclasses, q(c | x) = sum_j q(c, j | x) = softmax_c(logsumexp_j u_(c,j)) (what its forward, and so
   the exported graph, returns), and it is trained as in ``classifier_kd`` on the finer targets:
       L = alpha * T^2 KL(softmax(t / T) || softmax(u / T)) + (1 - alpha) * CE(y, q(. | x))

Steps 1, 2 and training on the pseudo-subclasses are the paper's; the two-sided split of each
direction, the scores standardised by sigma and the product with the teacher's class probability in
step 4 are how this file makes the split concrete. They keep sum_j p_T(c, j | x) = p_T(c | x), so the
subclass targets refine the teacher's class distribution and never contradict it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch.nn import functional as F

from stillroom.core.errors import StillroomError
from stillroom.plugins.classifier.methods.kd import ClassifierKD, KDParams


class LELPParams(KDParams):
    directions: int = Field(2, ge=1, description="m: principal directions per class; 2m pseudo-subclasses")
    null_space: bool = Field(True, description="project the embeddings onto the null space of the head first")


@dataclass
class SubclassSplit:
    """Steps 1-3 fitted on the training embeddings (float64): s(x) = <P z(x) - mu_c, u_(c,j)>."""

    projector: torch.Tensor  # P [D, D]
    means: torch.Tensor  # mu_c [C, D]
    directions: torch.Tensor  # u_(c,j) [C, K, D]: v_(c,1) / sigma, -v_(c,1) / sigma, v_(c,2) / sigma, ...

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, m: int, null_space: bool
    ) -> SubclassSplit:
        z, w = features.double(), head.double()
        dim, classes = z.shape[1], w.shape[0]
        projector = torch.eye(dim, dtype=z.dtype)
        if null_space:
            projector = projector - torch.linalg.pinv(w) @ w
        free = dim - (int(torch.linalg.matrix_rank(w)) if null_space else 0)
        if m > free:
            raise StillroomError(
                f"lelp: {m} directions per class, but the teacher's embedding leaves only {free}",
                f"set method.directions <= {free}",
            )
        z = z @ projector  # P is symmetric
        means, directions = [], []
        for c in range(classes):
            zc = z[labels == c]
            if len(zc) < 2:
                raise StillroomError(
                    f"lelp: class {c} has {len(zc)} training images; its directions need at least 2",
                    "give every class of the teacher training images",
                )
            mean = zc.mean(0)
            variance, vectors = torch.linalg.eigh((zc - mean).T @ (zc - mean) / len(zc))
            top = torch.argsort(variance, descending=True)[:m]
            v = vectors[:, top].T  # [m, D]
            v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))  # largest entry positive
            v = v / variance[top].clamp_min(1e-12).sqrt()[:, None]
            means.append(mean)
            directions.append(torch.stack([v, -v], dim=1).reshape(2 * m, dim))
        return cls(projector, torch.stack(means), torch.stack(directions))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """s [N, C, K] of embeddings [N, D]."""
        centred = (features.double() @ self.projector)[:, None, :] - self.means[None]  # [N, C, D]
        return torch.einsum("ncd,ckd->nck", centred, self.directions)

    def targets(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Step 4: the teacher's subclass logits t [N, C*K] (class-major)."""
        log_class = F.log_softmax(logits.double(), dim=-1)[:, :, None]
        return (log_class + F.log_softmax(self.scores(features), dim=-1)).flatten(1)


class LELP(ClassifierKD):
    name = "lelp"
    description = "KD on 2m pseudo-subclasses per class from PCA directions of the teacher's embeddings"
    paper = "Loo et al. 2024, Linear Projections of Teacher Embeddings for Few-Class Distillation"
    Params = LELPParams

    def subclasses(self) -> int:
        return 2 * self.params.directions

    def teacher_targets(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        p = self.params
        head = self.teacher.head.weight.detach()
        split = SubclassSplit.fit(features, self.labels, head, p.directions, p.null_space)
        return split.targets(logits, features)
