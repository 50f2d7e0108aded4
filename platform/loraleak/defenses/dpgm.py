"""DPGM-style training, as the paper's code runs it: a kernel-MMD loss whose mean embeddings get
Gaussian noise, in place of the fine-tune's mean squared error.

The paper's code (`inversion_network/defense/DPGM.py`, itself after DP-kernel, Jiang et al.) replaces
`F.mse_loss(pred, target)` — for the instance half and for the prior-preservation half alike — by:

    X = pred rows flattened (N x d), Y = target rows (M x d), Z = [X; Y]
    K = sum over bandwidths s in {1, 2, 4, 8, 16} of exp(-|z_i - z_j|^2 / (2 s^2))      ((N+M) x (N+M))
    f = [mean_i K(x_i, z)  for z in Z]       (the empirical kernel mean embedding of X, at every point)
    f~ = f + e,  e ~ N(0, c K),  c = noise_multiplier * sqrt(2 * #bandwidths) / N
    loss = (mean(f~[:N]) - 2 mean(f~[N:]) + mean K(Y, Y))^2

and trains with the ordinary optimiser and a batch gradient clip of 1.0. `DPGMLoss` does exactly that
(the noise drawn by eigen-decomposition of c K, from a seeded CPU generator, instead of torch's
MultivariateNormal, which rejects a K that rounding leaves semi-definite). Deliberately kept from the
paper's code:
  - the covariance is c·K, as the paper and DP-kernel code write it; the Gaussian mechanism on the
    RKHS mean embedding with sensitivity sqrt(2·#bandwidths)/N would need c²·K (less noise than the
    nominal σ whenever c > 1, which is every setting the paper runs);
  - the loss is the *squared* noisy MMD estimate;
  - noise on the class (public) half too.
Per-person accounting (unit "user") treats the N rows of the batch as one record, so its sensitivity
is sqrt(2·#bandwidths) instead of that over N.

The ε recorded for DPGM is nominal. DP-kernel's guarantee covers releasing the noisy embedding f~ of
private data X once; here X are the UNet's predictions, and the LoRA learns from the *gradient* of
the loss, in which the additive noise e has no part: d loss / d θ = 2 · MMD~ · d MMD / d θ, the exact
(noise-free) MMD gradient of the private batch times a random scalar. The noise changes the step's
size and sign, not its direction, so no per-record bound on what the LoRA reveals follows. The
figure is the RDP accountant's ε for σ over the fine-tune's steps at q = batch / photos (the plain
recipe's shuffled batches, so only approximately what the accountant assumes), recorded so runs can
be compared with the paper's (its σ = 0.6 / 0.975 / 16 are quoted as ε = 10 / 2 / 0.1).

Also worth knowing: at Stable Diffusion's size (d = 4·64·64) |pred - target|² is in the thousands, so
every cross-kernel K(x, y) underflows to 0 for bandwidths up to 16: the loss is then a constant plus
noise and the LoRA hardly learns — the paper's DPGM stops the leak by stopping the fine-tune.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from . import DefenseConfig
from .dp_accounting import DPPlan, epsilon_spent

KERNEL_BANDWIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0)  # the paper's RBF σ list
MECHANISM = ("DPGM (paper's code): squared kernel-MMD loss between predictions and targets, Gaussian noise "
             "N(0, c K) on the predictions' kernel mean embedding, c = sigma * sqrt(2 * kernels) / N")
GUARANTEE = ("nominal: the accountant's epsilon for the embedding noise; the LoRA's gradient is the noise-free MMD "
             "gradient times a noisy scalar, so the shared LoRA has no formal DP bound")


def rbf_kernel(z: torch.Tensor, bandwidths: tuple[float, ...] = KERNEL_BANDWIDTHS) -> torch.Tensor:
    """Sum of RBF kernels over every pair of rows of z (rows flattened): (n, n)."""
    z = z.flatten(1)
    gram = z @ z.T
    sq = gram.diagonal()
    distances = (sq[:, None] - 2 * gram + sq[None, :]).clamp_min(0)  # rounding can go below 0
    return sum(torch.exp(-distances / (2 * s**2)) for s in bandwidths)


def _gaussian(covariance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of N(0, covariance) (symmetric PSD up to rounding), on the CPU from `generator`."""
    cov = covariance.detach().double().cpu()
    values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
    z = torch.randn(values.shape[0], generator=generator, dtype=torch.float64)
    return vectors @ (values.clamp_min(0).sqrt() * z)


class DPGMLoss:
    """The DPGM loss of one fine-tune, with its noise plan and seeded noise."""

    def __init__(self, plan: DPPlan, *, noise_seed: int, bandwidths: tuple[float, ...] = KERNEL_BANDWIDTHS) -> None:
        if not bandwidths or any(not s > 0 for s in bandwidths):
            raise ConfigError(f"kernel bandwidths must be > 0, got {bandwidths}")
        self.plan, self.bandwidths = plan, tuple(bandwidths)
        self.generator = torch.Generator("cpu").manual_seed(noise_seed)

    @classmethod
    def for_defense(cls, defense: DefenseConfig, *, num_images: int, batch_size: int, steps: int,
                    noise_seed: int) -> "DPGMLoss":
        if defense.kind != "dpgm":
            raise ConfigError(f"DPGMLoss runs a 'dpgm' defense, not {defense.kind!r}")
        if defense.accounting == "image" and batch_size > num_images:
            raise ConfigError(f"dpgm with per-image accounting needs batch_size <= the number of photos, "
                              f"got batch_size={batch_size} for {num_images} photos")
        records, per_batch = (num_images, batch_size) if defense.accounting == "image" else (1, 1)
        plan = DPPlan.for_defense(defense, records=records, batch_size=per_batch, steps=steps)
        return cls(plan, noise_seed=noise_seed)

    def sensitivity(self, rows: int) -> float:
        """How far one record moves the rows' kernel mean embedding (RKHS norm): a photo, 1/rows of it."""
        full = math.sqrt(2 * len(self.bandwidths))
        return full / rows if self.plan.unit == "image" else full

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The paper's DP loss of predictions `pred` against targets `target` (same batch layout)."""
        x, y = pred.float().flatten(1), target.float().flatten(1)
        n = x.shape[0]
        if n == 0:
            return pred.sum() * 0.0
        kernel = rbf_kernel(torch.cat([x, y]), self.bandwidths)
        embedding = torch.cat([kernel[:n, :n].mean(0), kernel[:n, n:].mean(0)])  # f at every point of Z
        sigma = self.plan.noise_multiplier
        if sigma > 0:
            coeff = sigma * self.sensitivity(n)
            embedding = embedding + _gaussian(coeff * kernel, self.generator).to(embedding)
        distance = embedding[:n].mean() - 2 * embedding[n:].mean() + kernel[n:, n:].mean()
        return distance**2

    def epsilon_spent(self, steps: int) -> float:
        if steps == 0:
            return 0.0
        return epsilon_spent(self.plan.noise_multiplier, self.plan.delta, self.plan.sample_rate, steps)

    def record(self, steps: int) -> dict[str, Any]:
        spent = self.epsilon_spent(steps)
        return {
            "kind": "dpgm",
            "mechanism": MECHANISM,
            "guarantee": GUARANTEE,
            **self.plan.summary(),
            "epsilon_planned": self.plan.summary()["epsilon"],
            "epsilon": "inf" if math.isinf(spent) else spent,
            "steps_taken": steps,
            "sampling": "shuffle",
            "accounting_exact": self.plan.sample_rate >= 1.0,
            "kernel_bandwidths": list(self.bandwidths),
            "batch_grad_clip": self.plan.max_grad_norm,
        }
