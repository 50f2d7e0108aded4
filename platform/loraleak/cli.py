"""The `loraleak` command: one subcommand per pipeline stage.

Thin by design (like Ray's example entrypoints): parse arguments, validate configs at the edge,
call the library. Heavy imports happen inside each handler so `loraleak --help` stays fast.
Every user-facing failure is a `LoraleakError` printed as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .attack.cli import add_attack_commands
from .audit.cli import add_audit_command
from .command import new_parser, run_command
from .errors import LoraleakError
from .evaluation.cli import add_evaluation_commands
from .pipeline.cli import add_pipeline_commands
from .sweeps.cli import add_sweep_commands
from .zoo.cli import add_zoo_commands


def _add_identity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("identities")
    g.add_argument("--kind", choices=["synthetic", "folder"], default="synthetic")
    g.add_argument("--root", type=Path, help="folder source: ROOT/<identity>/*.jpg|png|pgm")
    g.add_argument("--num-identities", type=int, default=8, help="synthetic: how many identities")
    g.add_argument("--images-per-identity", type=int, default=5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--crop-fraction", type=float, default=None,
                   help="folder: centre crop of the short side (LFW faces: 0.48)")
    g.add_argument("--min-images", type=int, default=5)


def _identities_config(args: argparse.Namespace):
    from .config import from_dict
    from .identities import IdentitiesConfig

    data = {"kind": args.kind, "num_identities": args.num_identities,
            "images_per_identity": args.images_per_identity, "seed": args.seed,
            "min_images": args.min_images}
    if args.root is not None:
        data["root"] = str(args.root)
    if args.crop_fraction is not None:
        data["crop_fraction"] = args.crop_fraction
    return from_dict(IdentitiesConfig, data, where="arguments")


# --- identities ---------------------------------------------------------------------------------

def cmd_identities_preview(args: argparse.Namespace) -> None:
    from .identities import make_source
    from .imaging import save_grid

    source = make_source(_identities_config(args))
    images = []
    for identity in list(source.identities())[: args.show]:
        images += identity.load(args.size)[: args.per_identity]
    if not images:
        raise LoraleakError("no usable identities to preview")
    path = save_grid(images, args.out, ncols=args.per_identity, scale=args.scale)
    print(f"wrote {path}")


def cmd_identities_split(args: argparse.Namespace) -> None:
    from .identities import make_source, split_identities

    cfg = _identities_config(args)
    ids = [i.identity_id for i in make_source(cfg).identities()]
    split = split_identities(ids, heldout_fraction=args.heldout_fraction, seed=args.split_seed)
    for identity_id in ids:
        print(f"{identity_id}\t{split[identity_id]}")


# --- base ---------------------------------------------------------------------------------------

def cmd_base_pretrain(args: argparse.Namespace) -> None:
    from .base.pretrain import PretrainConfig, pretrain_base
    from .config import from_dict, read_yaml

    data = read_yaml(args.config) if args.config else {}
    if args.out is not None:
        data["out_dir"] = str(args.out)
    if args.images is not None:
        data["images"] = str(args.images)
    cfg = from_dict(PretrainConfig, data, where=str(args.config or "arguments"))
    out = pretrain_base(cfg)
    print(f"pipeline saved to {out}")


def cmd_base_sd14_shaped(args: argparse.Namespace) -> None:
    from .base.sd14_shaped import SD14ShapedConfig, save_sd14_shaped

    try:
        cfg = SD14ShapedConfig(resolution=args.resolution, seed=args.seed)
    except ValueError as e:
        raise LoraleakError(str(e)) from None
    if (args.out / "model_index.json").is_file():
        raise LoraleakError(f"{args.out} already holds a pipeline")
    counts = save_sd14_shaped(args.out, cfg)
    print(f"SD-1.4-shaped pipeline (random weights, {cfg.resolution} px) saved to {args.out}: "
          + ", ".join(f"{name} {n:,} parameters" for name, n in counts.items()))


def cmd_base_sample(args: argparse.Namespace) -> None:
    from .base.loading import load_base_pipeline
    from .generate import generate_images
    from .imaging import save_grid

    pipe = load_base_pipeline(args.base)
    images = generate_images(pipe, prompt=args.prompt, n=args.n, seed=args.seed,
                             num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(f"wrote {save_grid(images, args.out, scale=args.scale)}")


def cmd_base_info(args: argparse.Namespace) -> None:
    from .base.loading import base_fingerprint, base_info, load_base_pipeline

    info = base_info(load_base_pipeline(args.base))
    info["fingerprint"] = base_fingerprint(args.base)
    print(json.dumps(info, indent=2, default=str))


# --- scorers ------------------------------------------------------------------------------------

def cmd_scorer_train(args: argparse.Namespace) -> None:
    from .config import from_dict, read_yaml
    from .scoring.synthetic_scorer import SyntheticScorerConfig, train_synthetic_scorer

    data = read_yaml(args.config) if args.config else {}
    cfg = from_dict(SyntheticScorerConfig, data, where=str(args.config or "defaults"))
    metrics = train_synthetic_scorer(cfg, args.out)
    print(json.dumps(metrics, indent=2))


# --- victim fine-tune ---------------------------------------------------------------------------

def cmd_finetune(args: argparse.Namespace) -> None:
    from .config import load_yaml
    from .victim import VictimConfig, run_victim

    overrides = {"out_dir": str(args.out)} if args.out else None
    cfg = load_yaml(VictimConfig, args.config, overrides)
    summary = run_victim(cfg)
    print(json.dumps(summary, indent=2, default=str))


def cmd_generate(args: argparse.Namespace) -> None:
    from .base.loading import load_base_pipeline
    from .generate import generate_images
    from .imaging import save_grid

    pipe = load_base_pipeline(args.base)
    images = generate_images(pipe, prompt=args.prompt, n=args.n, seed=args.seed,
                             num_inference_steps=args.steps, guidance_scale=args.guidance,
                             lora=args.lora, lora_scale=args.lora_scale)
    print(f"wrote {save_grid(images, args.out, scale=args.scale)}")


# --- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser()

    ident = sub.add_parser("identities", help="private photo sets: preview and split").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = ident.add_parser("preview", help="save a grid of identities x images")
    _add_identity_args(p)
    p.add_argument("--show", type=int, default=8, help="identities to show")
    p.add_argument("--per-identity", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_identities_preview)
    p = ident.add_parser("split", help="print the deterministic attack_train / heldout split")
    _add_identity_args(p)
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.set_defaults(func=cmd_identities_split)

    base = sub.add_parser("base", help="the base diffusion model: pretrain, sample, info").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = base.add_parser("pretrain", help="pretrain the tiny SD-architecture base on public faces")
    p.add_argument("--config", type=Path, help="YAML PretrainConfig (defaults: synthetic faces)")
    p.add_argument("--images", type=Path, help="folder of public photos ROOT/<id>/*.jpg instead of synthetic")
    p.add_argument("--out", type=Path, help="output directory (overrides out_dir)")
    p.set_defaults(func=cmd_base_pretrain)
    p = base.add_parser("sd14-shaped", help="save SD 1.4's architecture with random weights (no download; ~4.3 GB)")
    p.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    p.add_argument("--resolution", type=int, default=512,
                   help="image size the folder declares (SD's 512; 64 for a CPU dry run: same weight shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_base_sd14_shaped)
    for name, fn, hlp in [("sample", cmd_base_sample, "save a grid of base-model samples"),
                          ("info", cmd_base_info, "print a base model's architecture and fingerprint")]:
        p = base.add_parser(name, help=hlp)
        p.add_argument("--base", default="tiny", help="'tiny', 'tiny-lfw', a pipeline directory or a hub id")
        if name == "sample":
            _add_generation_args(p, prompt_default="A human face.")
        p.set_defaults(func=fn)

    scorer = sub.add_parser("scorer", help="face-identity scorers").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = scorer.add_parser("train", help="train the synthetic-face identity embedder")
    p.add_argument("--config", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_scorer_train)

    p = sub.add_parser("finetune", help="DreamBooth-LoRA fine-tune one victim identity and check the leak")
    p.add_argument("config", type=Path, help="YAML VictimConfig")
    p.add_argument("--out", type=Path, help="output directory (overrides out_dir)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="generate an image grid from a base model and optional LoRA")
    p.add_argument("--base", default="tiny")
    p.add_argument("--lora", type=Path, help="a pytorch_lora_weights.safetensors file or its directory")
    p.add_argument("--lora-scale", type=float, default=1.0)
    _add_generation_args(p, prompt_default=None)
    p.set_defaults(func=cmd_generate)

    add_zoo_commands(sub)
    add_attack_commands(sub)
    add_evaluation_commands(sub)
    add_pipeline_commands(sub)
    add_sweep_commands(sub)
    add_audit_command(sub)
    return parser


def _add_generation_args(p: argparse.ArgumentParser, prompt_default: str | None) -> None:
    p.add_argument("--prompt", default=prompt_default, required=prompt_default is None)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--scale", type=int, default=4, help="upscale the saved grid for viewing")
    p.add_argument("--out", type=Path, required=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
