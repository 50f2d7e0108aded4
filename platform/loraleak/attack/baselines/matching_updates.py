"""Baseline: matching model updates (the paper's baseline; Geiping et al. 2020's inverting gradients,
a DLG variant, Zhu et al. 2019).

Optimise dummy training data — a prompt embedding z and dummy image latents — so that the LoRA
update they would cause points the way the observed LoRA does. The simulation that makes this
practical: peft initialises B to zero, so the shared B is the sum of the fine-tune's updates of B,
and at B = 0 the gradient of the DreamBooth loss w.r.t. B is taken at the shared A (A moves little
while B is small). So, with the base UNet + LoRA(A_observed, B = 0):

    g(z, x) = ∂/∂B  MSE(unet(noisy(x, ε, t), t, z; A, B=0), target(x, ε, t))      (create_graph)
    objective = 1 − mean over B matrices of cos(g_m, −B_m)        ("per_matrix", the default)
           or 1 − cos(g, −B) of all matrices as one vector           ("joint": inverting gradients' own)

and Adam (lr 0.1, the paper's) descends it w.r.t. z (and x). Cosine, not distance: the victim's
step count, learning rate and the LoRA scale change the length of B, not (much) its direction.
Per matrix by default because the victim trains with Adam: its per-element normalisation gives
every LoRA matrix an update of similar size whatever the size of its gradient, so a joint cosine
would be ruled by the few matrices whose raw gradients are largest (on a tiny base, measured: the
joint cosine lowered the objective without moving z towards the true prompt embedding; per matrix
it did, see tests/test_baselines.py). The prior-preservation half of the victim's loss is left
out: its images are the base's own samples, so its gradient at B = 0 is near zero in expectation.
The noise ε and timesteps t are unknown to the adversary: a fixed draw per (dummy image, timestep)
stands in for the fine-tune's many random ones.

Second derivatives through the UNet's attention need PyTorch's math SDPA kernel (the fused kernels
have no double backward), so inversion runs under it. Nothing is fitted: `fit` records the base
and the LoRA layout of the zoo the other attacks are fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ...errors import InputError
from ...finetune.loop import training_noise_scheduler
from ...lora.io import check_lora_fits, lora_factors, module_order_key
from ..api import AttackOutput, LoraInput
from ...lora.batched import batched_lora
from ..lora_inputs import LoraLayout, lora_layout
from ..model import text_encoder_sha256
from .common import check_lora, layout_from_json, layout_to_json, load_baseline, save_baseline
from .registry import FitInputs, register_baseline

KIND = "matching_updates"


@dataclass(frozen=True)
class MatchingUpdatesConfig:
    steps: int = 200  # Adam steps
    lr: float = 0.1  # the paper's
    num_images: int = 2  # dummy images (their latents are optimised with z when optimise_latents)
    timesteps: tuple[int, ...] = (125, 375, 625, 875)  # every dummy image is noised at each of these
    optimise_latents: bool = True  # DLG optimises the dummy data too; False keeps the random latents
    # z's start: None = random (Gaussian with the spread of the empty prompt's embedding, as DLG
    # starts from noise); a prompt = its embedding (e.g. "A human face.", what an adversary may guess).
    init_prompt: str | None = None
    similarity: Literal["per_matrix", "joint"] = "per_matrix"
    keep_best: bool = True  # answer with the z of the lowest objective seen, not the last one

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_images < 1:
            raise ValueError(f"steps and num_images must be >= 1, got {self.steps}, {self.num_images}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.similarity not in ("per_matrix", "joint"):
            raise ValueError(f"similarity must be 'per_matrix' or 'joint', got {self.similarity!r}")
        if not self.timesteps or any(t < 0 for t in self.timesteps):
            raise ValueError(f"timesteps must be a non-empty list of diffusion steps >= 0, got {self.timesteps}")


@dataclass
class Inversion:
    prompt_embeds: torch.Tensor  # (P, W): the answer
    latents: torch.Tensor  # (num_images, C, h, w): the dummy latents at that point
    initial: torch.Tensor  # (P, W): z where the optimisation started
    objectives: list[float] = field(default_factory=list)  # 1 − cos per step, before that step's update
    best_step: int = 0


def _observed_factors(lora: LoraInput, device: torch.device) -> tuple[list[str], dict[str, torch.Tensor],
                                                                        dict[str, torch.Tensor]]:
    factors = lora_factors(dict(lora.state_dict), "unet")
    modules = sorted(factors, key=module_order_key)
    downs = {m: factors[m][0].to(device, torch.float32) for m in modules}
    ups = {m: factors[m][1].to(device, torch.float32) for m in modules}
    return modules, downs, ups


class MatchingUpdatesAttack:
    kind = KIND

    def __init__(self, config: MatchingUpdatesConfig, pipe: Any, layout: LoraLayout | None = None,
                 record: Mapping[str, Any] | None = None) -> None:
        self.config, self.pipe, self.layout = config, pipe, layout
        self.record = dict(record or {})
        self.scheduler = training_noise_scheduler(pipe)
        horizon = self.scheduler.config.num_train_timesteps
        if any(t >= horizon for t in config.timesteps):
            raise InputError(f"timesteps {list(config.timesteps)} must be below the base's {horizon} training steps")

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _check(self, lora: LoraInput) -> None:
        if self.layout is not None:
            check_lora(lora, self.layout, KIND)
        else:
            lora_layout(lora.state_dict)  # Linear UNet LoRA matrices, paired, one rank per module
        check_lora_fits(lora.state_dict, self.pipe)

    @torch.no_grad()
    def _reference_embedding(self, prompt: str) -> torch.Tensor:
        return self.pipe.encode_prompt([prompt], self.device, 1, False)[0][0].float()

    def starting_point(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, latents, noise) at the start, drawn on the CPU from the seed (the same on any device)."""
        unet, cfg = self.pipe.unet, self.config
        generator = torch.Generator().manual_seed(seed)
        if cfg.init_prompt is None:
            reference = self._reference_embedding("")
            z = torch.randn(reference.shape, generator=generator) * reference.std().cpu()
        else:
            z = self._reference_embedding(cfg.init_prompt).cpu()
        size = unet.config.sample_size
        shape = (cfg.num_images, unet.config.in_channels, size, size)
        latents = torch.randn(shape, generator=generator)
        noise = torch.randn((cfg.num_images * len(cfg.timesteps), *shape[1:]), generator=generator)
        return z.to(self.device), latents.to(self.device), noise.to(self.device)

    def simulated_gradients(self, z: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                            ups: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """∂ loss / ∂B at B = 0 for every module of `ups` (zero leaves installed by the caller), with graph."""
        cfg, scheduler = self.config, self.scheduler
        steps = len(cfg.timesteps)
        x = latents.repeat_interleave(steps, dim=0)  # image i at every timestep
        t = torch.tensor(cfg.timesteps, device=self.device).repeat(latents.shape[0])
        noisy = scheduler.add_noise(x, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x, noise, t)
        dtype = self.pipe.unet.dtype
        pred = self.pipe.unet(noisy.to(dtype), t, z.to(dtype).expand(x.shape[0], *z.shape), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        return list(torch.autograd.grad(loss, list(ups.values()), create_graph=True))

    def _dissimilarity(self, simulated: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
        """1 − cosine: of all matrices as one vector ("joint", inverting gradients), or the mean over
        matrices ("per_matrix": each LoRA matrix counts alike, however large its update)."""
        if self.config.similarity == "joint":
            dot = sum((g * d).sum() for g, d in zip(simulated, observed))
            norms = torch.sqrt(sum((g ** 2).sum() for g in simulated)) \
                * torch.sqrt(sum((d ** 2).sum() for d in observed))
            return 1 - dot / norms.clamp_min(1e-30)
        cosines = [F.cosine_similarity(g.reshape(-1), d.reshape(-1), dim=0, eps=1e-30)
                   for g, d in zip(simulated, observed)]
        return 1 - torch.stack(cosines).mean()

    def invert(self, lora: LoraInput, seed: int = 0, show_progress: bool = False) -> Inversion:
        """Optimise z (and the dummy latents) to make the simulated update match the LoRA's B."""
        self._check(lora)
        cfg = self.config
        modules, downs, observed = _observed_factors(lora, self.device)
        target = [-observed[m] for m in modules]  # the update B − B_0 = B, as a descent direction −B
        target_norm = torch.sqrt(sum((b ** 2).sum() for b in target))
        if not target_norm > 0:
            raise InputError("the LoRA's B matrices are all zero: an untrained LoRA carries no update to match")
        z, latents, noise = self.starting_point(seed)
        z.requires_grad_(True)
        latents.requires_grad_(cfg.optimise_latents)
        optimizer = torch.optim.Adam([z, latents] if cfg.optimise_latents else [z], lr=cfg.lr)
        # Per-module zero B leaves, shape (1, out, r): one LoRA for the whole dummy batch. The scale
        # alpha / r multiplies every gradient alike: it cannot change a cosine, so 1 is used.
        zeros = {m: torch.zeros(1, observed[m].shape[0], observed[m].shape[1], device=self.device,
                                requires_grad=True) for m in modules}
        factors = {m: (downs[m][None], zeros[m]) for m in modules}
        result = Inversion(z.detach().clone(), latents.detach().clone(), z.detach().float().cpu().clone())
        best = float("inf")
        progress = tqdm(range(cfg.steps), desc="matching updates", disable=not show_progress)
        # enable_grad: a caller may sample under no_grad; this optimisation needs gradients regardless.
        with torch.enable_grad(), batched_lora(self.pipe.unet, factors, 1.0), sdpa_kernel(SDPBackend.MATH):
            for step in progress:
                grads = self.simulated_gradients(z, latents, noise, zeros)
                objective = self._dissimilarity([g[0] for g in grads], target)
                value = float(objective.detach())
                result.objectives.append(value)
                if value < best or not cfg.keep_best:
                    best = value
                    result.prompt_embeds, result.latents = z.detach().clone(), latents.detach().clone()
                    result.best_step = step
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                progress.set_postfix(objective=f"{value:.4f}")
        result.prompt_embeds, result.latents = result.prompt_embeds.float().cpu(), result.latents.float().cpu()
        return result

    def objective(self, lora: LoraInput, prompt_embeds: torch.Tensor, latents: torch.Tensor,
                  noise: torch.Tensor) -> float:
        """The objective at given dummy data: latents (num_images, C, h, w), noise (num_images ·
        len(timesteps), C, h, w; image i at timestep j is row i · len(timesteps) + j)."""
        self._check(lora)
        modules, downs, observed = _observed_factors(lora, self.device)
        zeros = {m: torch.zeros(1, *observed[m].shape, device=self.device, requires_grad=True) for m in modules}
        with torch.enable_grad(), batched_lora(self.pipe.unet, {m: (downs[m][None], zeros[m]) for m in modules},
                                               1.0), sdpa_kernel(SDPBackend.MATH):
            grads = self.simulated_gradients(prompt_embeds.to(self.device), latents.to(self.device),
                                             noise.to(self.device), zeros)
            return float(self._dissimilarity([g[0].detach() for g in grads], [-observed[m] for m in modules]))

    def reconstruct(self, lora: LoraInput, n: int = 1, seed: int = 0) -> AttackOutput:
        # One embedding per LoRA (n does not matter); the seed draws z's start, latents and noise.
        return AttackOutput(prompt_embeds=self.invert(lora, seed).prompt_embeds)

    # --- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        record = {"text_encoder_sha256": text_encoder_sha256(self.pipe.text_encoder), **self.record,
                  "layout": layout_to_json(self.layout)}
        return save_baseline(directory, KIND, self.config, record, {})

    @classmethod
    def from_pretrained(cls, directory: str | Path, pipe: Any) -> "MatchingUpdatesAttack":
        """Load onto `pipe`, which must be the base it was made for (its text encoder is checked)."""
        directory = Path(directory)
        config, record, _ = load_baseline(directory, KIND, MatchingUpdatesConfig)
        expected = record.get("text_encoder_sha256")
        if expected is not None and text_encoder_sha256(pipe.text_encoder) != expected:
            raise InputError(f"the matching-updates baseline in {directory} was made for another base (fingerprint "
                             f"{record.get('base_fingerprint')})")
        extra = {k: v for k, v in record.items() if k not in ("kind", "format_version", "config", "layout")}
        return cls(config, pipe, layout_from_json(record.get("layout")), extra)


def load(directory: Path, pipe: Any) -> MatchingUpdatesAttack:
    if pipe is None:
        raise InputError("the matching-updates baseline simulates fine-tuning: it needs the base pipeline")
    return MatchingUpdatesAttack.from_pretrained(directory, pipe)


def build(settings: MatchingUpdatesConfig, inputs: FitInputs) -> MatchingUpdatesAttack:
    """Nothing to learn: the layout it attacks and the base."""
    return MatchingUpdatesAttack(settings, inputs.pipe, inputs.layout)


register_baseline(KIND, MatchingUpdatesConfig, build, load)
