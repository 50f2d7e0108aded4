"""The victims' utility frontier: how strong and how bound a profile's victims are after r fine-tune steps.

The curve the profiles' fine-tune settings are chosen from. A profile's victims (its identities, base,
fine-tune settings and scorer, `loraleak run --profile P` without the attack) are fine-tuned once, K
per UNet pass, with snapshots at each requested step; every snapshot is then sampled under the
owner's prompt ("org") and the no-attack controls (class prompt, empty prompt, a wrong trigger),
against the base, and scored against the victims and the other identities of the set. Printed per
step: org verified, org top-1 (image and victim), org similarity, strength (org − base), binding
(org − the best control, per victim) and each control − base, means over victims with the spread
(min / max) and bootstrap intervals, and the fine-tune wall time to that step per victim.

    python benchmarks/victim_frontier.py --profile quick --steps 100,250,500 --victims 8
    python benchmarks/victim_frontier.py --profile lfw --steps 250,500,1000 --victims 8 --set lr=2e-3
    python benchmarks/victim_frontier.py --profile lfw --steps 250 --set mixed_precision=bf16 --compile  # faster mode
    python benchmarks/victim_frontier.py --profile lfw --steps 250 --set 'defense={kind: dp_sgd, epsilon: 50}'
        # a training-time defense: its fine-tunes run one at a time (per-sample clipping), as in a zoo

Same seeds, prompts and samplers as the evaluation stage (`loraleak.evaluation.worker`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from loraleak.base.loading import base_fingerprint, load_base_pipeline
from loraleak.config import from_dict, to_dict
from loraleak.evaluation.config import CONTROLS
from loraleak.evaluation.metrics import score_images, summarise
from loraleak.evaluation.regime import BOUND_MARGIN, STRONG_TOP1_VICTIM, STRONG_VERIFIED, study_regime
from loraleak.evaluation.worker import victim_seed, wrong_trigger
from loraleak.finetune.batched import BatchedOptions, finetune_lora_batched
from loraleak.finetune.class_images import load_or_sample_class_images, pipeline_resolution
from loraleak.finetune.config import FinetuneConfig
from loraleak.finetune.dreambooth_lora import finetune_lora
from loraleak.generate import generate_images, lora_loaded
from loraleak.identities import make_source
from loraleak.imaging import save_grid
from loraleak.pipeline.cli import load_pipeline_config
from loraleak.scoring import make_scorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick", help="quick | lfw | paper (its identities, base, fine-tune, scorer)")
    p.add_argument("--steps", default="100,250,500", help="fine-tune steps at which to measure (the last is run)")
    p.add_argument("--base", help="another base than the profile's (a pipeline folder or name)")
    p.add_argument("--victims", type=int, default=8, help="victims fine-tuned and measured")
    p.add_argument("--candidates", type=int, default=20, help="identities a victim is identified among")
    p.add_argument("--k", type=int, default=8, help="fine-tunes per UNet pass")
    p.add_argument("--n-images", type=int, default=None, help="images per condition (default: the profile's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a finetune setting over the profile's, e.g. lr=2e-3 (YAML value)")
    p.add_argument("--guidance", default=None,
                   help="classifier-free guidance scales to sample at, e.g. 3,5,7 (default: the profile's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet of the batched fine-tune")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks/victim_frontier"))
    p.add_argument("--json", type=Path, help="write the table as JSON here")
    return p.parse_args(argv)


def finetune_settings(profile_cfg: Any, assignments: list[str], steps: list[int]) -> FinetuneConfig:
    values = to_dict(profile_cfg.zoo.finetune)
    for text in assignments:
        key, _, value = text.partition("=")
        values[key.strip()] = yaml.safe_load(value)
    values.update(steps=max(steps), snapshot_steps=sorted(steps))
    return from_dict(FinetuneConfig, values, where="--set")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = sorted({int(s) for s in args.steps.split(",")})
    cfg = load_pipeline_config(args.profile, assignments=[f"base.ref={args.base}"] if args.base else None)
    ft = finetune_settings(cfg, args.set, steps)
    ev = cfg.evaluation
    n_images = args.n_images or ev.n_images
    guidances = [float(g) for g in args.guidance.split(",")] if args.guidance else [ev.guidance_scale]
    out = args.out / f"{args.profile}-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)

    identities = sorted(make_source(cfg.identities).identities(), key=lambda i: i.identity_id)
    if cfg.zoo.max_identities:
        identities = identities[: max(cfg.zoo.max_identities, args.candidates)]
    victims, candidates = identities[: args.victims], identities[: max(args.candidates, args.victims)]
    pipe = load_base_pipeline(cfg.base.ref)
    resolution = pipeline_resolution(pipe)
    fingerprint = base_fingerprint(cfg.base.ref)
    print(f"profile {args.profile}: base {cfg.base.ref}, {len(victims)} victims among {len(candidates)} "
          f"identities, scorer {ev.scorer}; fine-tune {json.dumps(to_dict(ft), default=str)}", flush=True)

    class_images = None
    if ft.prior_preservation:
        class_images, _ = load_or_sample_class_images(
            pipe, Path("runs/class-images"), prompt=ft.class_prompt, count=ft.num_class_images,
            seed=ft.class_images_seed, num_inference_steps=ft.class_inference_steps,
            guidance_scale=ft.class_guidance_scale, base_fingerprint=fingerprint, show_progress=True)

    started = time.perf_counter()
    runs = []
    # A training-time defense (DP-SGD, DPGM) clips per sample: those fine-tunes run one at a time, as in the zoo.
    one_at_a_time = ft.defense.kind != "none"
    per_pass = 1 if one_at_a_time else args.k
    for first in range(0, len(victims), per_pass):
        group = victims[first: first + per_pass]
        cfgs = [dataclasses.replace(ft, seed=1000 + first + j) for j in range(len(group))]
        if one_at_a_time:
            runs.append((group[0], cfgs[0], finetune_lora(pipe, group[0].load(resolution), cfgs[0],
                                                          out / group[0].identity_id, base_fingerprint=fingerprint,
                                                          class_images=class_images, show_progress=False)))
            continue
        results = finetune_lora_batched(pipe, [v.load(resolution) for v in group], cfgs,
                                        [out / v.identity_id for v in group], base_fingerprint=fingerprint,
                                        class_images=[class_images] * len(group) if class_images else None,
                                        options=BatchedOptions(compile=args.compile))
        runs += list(zip(group, cfgs, results))
    finetune_s = time.perf_counter() - started
    per_step_s = finetune_s / len(victims) / max(steps)

    scorer = make_scorer(ev.scorer)
    references = {i.identity_id: [e for e in scorer.embed(i.load(ev.reference_size)) if e is not None]
                  for i in candidates}
    references = {k: v for k, v in references.items() if v}
    # One fine-tune, measured at every (step, guidance): guidance is a sampling setting, not a training one.
    points = [(step, g) for step in steps for g in guidances]
    scores: dict[tuple[int, float], dict[str, list]] = {p: {} for p in points}
    for victim, vcfg, result in runs:
        if victim.identity_id not in references:
            continue
        seed = victim_seed(ev.seed, victim.identity_id)
        prompts = {"org": result.instance_prompt, "victim_class_prompt": vcfg.class_prompt, "victim_empty_prompt": "",
                   "victim_wrong_trigger": vcfg.instance_prompt.format(trigger=wrong_trigger(seed, result.trigger))}
        for g in guidances:
            sample = dict(n=n_images, seed=seed, num_inference_steps=ev.sample_steps, guidance_scale=g)
            base_images = generate_images(pipe, prompt=vcfg.class_prompt, **sample)
            for step, path in result.snapshots:
                if (step, g) not in scores:
                    continue
                with lora_loaded(pipe, path):
                    images = {name: generate_images(pipe, prompt=p, **sample) for name, p in prompts.items()}
                images["base"] = base_images
                for name, ims in images.items():
                    scores[step, g].setdefault(name, []).append(
                        score_images(scorer, ims, references, victim.identity_id))
                save_grid([im for ims in images.values() for im in ims] + victim.load(resolution)[:n_images],
                          out / f"{victim.identity_id}-step{step}-g{g:g}.png", ncols=n_images, scale=2)

    rows = []
    print(f"\nfine-tune: {per_step_s * 1000:.1f} ms per step per victim ({per_pass} per pass, {args.threads} threads); "
          f"{len(references)} candidates, chance top-1 {1 / len(references):.3f}; images in {out}")
    print(f"{'steps':>6}{'cfg':>5}{'s/victim':>9}{'verified':>9}{'top1 img':>9}{'top1 vic':>9}{'org sim':>8}"
          f"{'strength [95% CI]':>26}{'binding [95% CI]':>26}  control - base")
    for step, g in points:
        metrics = {name: summarise(s) for name, s in scores[step, g].items()}
        regime = study_regime(metrics)
        org = metrics["org"]
        strengths = [v.strength for v in regime.victims if v.strength is not None]
        row = {"steps": step, "guidance_scale": g, "finetune_s_per_victim": per_step_s * step, "org_verified": org.verified.value,
               "org_top1_image": org.top1_image.value, "org_top1_victim": org.top1_victim.value,
               "org_similarity": org.similarity.value, "regime": regime.regime,
               "strength": dataclasses.asdict(regime.strength), "binding": dataclasses.asdict(regime.binding),
               "strength_min_max": [min(strengths), max(strengths)] if strengths else None,
               "control_over_base": {c: e.value for c, e in regime.control_over_base.items()},
               "per_victim": [dataclasses.asdict(v) for v in regime.victims],
               "per_victim_org_verified": [v.verified for v in org.victims]}
        rows.append(row)
        ci = lambda e: f"{e.value:+.3f} [{e.low:+.3f},{e.high:+.3f}]"  # noqa: E731
        controls = " ".join(f"{c.removeprefix('victim_')} {e.value:+.3f}"
                            for c, e in regime.control_over_base.items() if e.value is not None)
        print(f"{step:>6}{g:>5g}{per_step_s * step:>9.1f}{org.verified.value:>9.2f}{org.top1_image.value:>9.2f}"
              f"{org.top1_victim.value:>9.2f}{org.similarity.value:>8.3f}{ci(regime.strength):>26}"
              f"{ci(regime.binding):>26}  {controls}  -> {regime.regime}")
        print(f"{'':>11} per victim verified {[round(v.verified, 2) for v in org.victims]}, "
              f"strength {[round(s, 3) for s in strengths]}")
    print(f"targets: org verified >= {STRONG_VERIFIED}, top-1 victim >= {STRONG_TOP1_VICTIM}, "
          f"every control within {BOUND_MARGIN} of base")
    if args.json:
        args.json.write_text(json.dumps({"profile": args.profile, "finetune": to_dict(ft), "rows": rows}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
