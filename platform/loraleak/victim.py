"""One victim, end to end: fine-tune a LoRA on one identity, then check what it shows.

This is the smallest honest answer to "does the fine-tune carry the person?": images from the true
instance prompt ("org", the owner's utility) are scored against the person's private photos and
compared with base-model images of the class prompt ("base", no leak), and with distractor
identities for identification. The zoo and attack stages build on the same pieces at scale.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from .base.loading import base_fingerprint, load_base_pipeline
from .config import to_dict
from .errors import ConfigError
from .evaluation import score_images, summarise_victim
from .finetune.config import FinetuneConfig
from .finetune.dreambooth_lora import finetune_lora
from .generate import generate_images
from .identities import IdentitiesConfig, make_source
from .imaging import save_grid
from .scoring import make_scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VictimConfig:
    out_dir: Path
    base: str = "tiny"
    identities: IdentitiesConfig = field(default_factory=IdentitiesConfig)
    identity_index: int = 0          # which identity of the source is the victim
    num_distractors: int = 19        # other identities of the source, for top-1 identification
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    scorer: str = "synthetic"        # "synthetic" | "dlib"
    reference_size: int = 64         # size at which private photos are given to the scorer
    n_images: int = 16               # generated images per condition
    sample_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.identity_index < 0 or self.num_distractors < 0 or self.n_images < 1:
            raise ValueError("identity_index, num_distractors must be >= 0 and n_images >= 1")


def run_victim(cfg: VictimConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identities = list(make_source(cfg.identities).identities())
    needed = cfg.identity_index + 1
    if len(identities) < needed:
        raise ConfigError(f"identity_index {cfg.identity_index} but the source has only "
                          f"{len(identities)} usable identities")
    victim = identities[cfg.identity_index]
    others = [i for i in identities if i.identity_id != victim.identity_id][: cfg.num_distractors]

    pipe = load_base_pipeline(cfg.base)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    train_images = victim.load(resolution)
    log.info("victim %s: %d photos at %d px; base %s", victim.identity_id, len(train_images),
             resolution, cfg.base)

    result = finetune_lora(pipe, train_images, cfg.finetune, out / "lora",
                           base_ref=cfg.base, base_fingerprint=base_fingerprint(cfg.base))
    final_lora = result.snapshots[-1][1]

    gen = dict(n=cfg.n_images, seed=cfg.seed, num_inference_steps=cfg.sample_steps,
               guidance_scale=cfg.guidance_scale)
    conditions = {
        "org": generate_images(pipe, prompt=result.instance_prompt, lora=final_lora, **gen),
        "victim_class_prompt": generate_images(pipe, prompt=cfg.finetune.class_prompt,
                                               lora=final_lora, **gen),
        "base": generate_images(pipe, prompt=cfg.finetune.class_prompt, **gen),
    }

    scorer = make_scorer(cfg.scorer)
    references = {i.identity_id: [e for e in scorer.embed(i.load(cfg.reference_size)) if e is not None]
                  for i in [victim, *others]}
    references = {k: v for k, v in references.items() if v}
    if victim.identity_id not in references:
        raise ConfigError(f"the scorer finds no face in any photo of victim {victim.identity_id}")

    scores = {}
    for name, images in conditions.items():
        save_grid(images, out / f"{name}.png", ncols=8, scale=2)
        scores[name] = summarise_victim(score_images(scorer, images, references, victim.identity_id))
    save_grid(victim.load(resolution), out / "private.png", scale=2)

    summary = {
        "victim": victim.identity_id,
        "trigger": result.trigger,
        "instance_prompt": result.instance_prompt,
        "candidates": len(references),
        "scorer": cfg.scorer,
        "final_loss": result.final_loss,
        "finetune_wall_s": round(result.wall_time_s, 1),
        "wall_s": round(time.time() - t0, 1),
        "scores": {k: dataclasses.asdict(v) for k, v in scores.items()},
        "out_dir": str(out),
        "config": to_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary)
    return summary


def _print_table(summary: dict) -> None:
    print(f"\nvictim {summary['victim']} (trigger '{summary['trigger']}'), scorer {summary['scorer']}, "
          f"{summary['candidates']} candidate identities (chance top-1 {1 / summary['candidates']:.3f})")
    print(f"{'images':<22}{'face':>6}{'sim':>7}{'dist':>7}{'verified':>10}{'top-1':>7}{'rank':>7}")
    for name, s in summary["scores"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{name:<22}{s['face_found']:>6.2f}{fmt(s['similarity']):>7}{fmt(s['distance']):>7}"
              f"{s['verified']:>10.2f}{s['top1_image']:>7.2f}{fmt(s['rank']):>7}")
    print(f"grids and summary.json in {summary['out_dir']}\n")
