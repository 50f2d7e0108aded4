"""The smallest study that runs every stage of `loraleak run`, shared by the pipeline and sweep tests
(imported by them; pytest puts this folder on the path)."""

import time

import psutil

SMALLEST = {
    "identities": {"kind": "synthetic", "num_identities": 6, "images_per_identity": 3, "heldout_fraction": 0.5},
    "base": {"ref": "tiny"},
    "zoo": {"finetune": {"rank": 2, "alpha": 2, "steps": 4, "lr": 1e-3, "prior_preservation": False},
            "num_snapshots": 2, "workers": 0},
    "attack": {"max_steps": 2, "batch_size": 2, "val_fraction": 0.0, "checkpoint_every": 2, "val_every": 2,
               "resources_per_worker": {"CPU": 1}},
    "baselines": [{"name": "nearest_neighbour", "kind": "nearest_neighbour"},
                  {"name": "pca_map", "kind": "pca_map", "settings": {"components": 2}}],
    "evaluation": {"n_images": 2, "sample_steps": 2, "reference_size": 32, "n_boot": 100, "workers": 1},
}
# Without the baselines: what the sweep tests vary.
SMALLEST_NO_BASELINES = {k: v for k, v in SMALLEST.items() if k != "baselines"}


# --- one tiny zoo for the attack and baseline tests ---------------------------------------------------------
# A random 16 px base, 5 synthetic identities (4 attack_train, 1 heldout), rank-2 LoRAs on to_q/to_v, 5 steps
# with snapshots at r = 0, 2, 5, built by the zoo module. An untrained UNet barely reads its conditioning,
# so the base's cross-attention outputs are amplified: z then matters to the ε-loss, as in a trained base.
from loraleak.base.tiny import TinyBaseConfig  # noqa: E402

TINY = TinyBaseConfig(resolution=16, unet_channels=(32, 32), attention_levels=1, text_width=32,
                      text_layers=1, text_heads=1, vae_channels=(32,))
TINY_ZOO_IDENTITIES = {"kind": "synthetic", "num_identities": 5, "images_per_identity": 3}
TINY_ZOO_FINETUNE = {"rank": 2, "alpha": 2, "steps": 5, "prior_preservation": False, "lr": 1e-2}


def tiny_zoo_base():
    """The random 16 px SD-architecture base of the tiny zoo (cross-attention outputs amplified)."""
    import torch

    from loraleak.base.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(TINY)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(10.0)
    return pipe


def build_tiny_zoo(work):
    """The tiny zoo under `work` (base in work/base, zoo in work/zoo); returns its ZooConfig."""
    from loraleak.config import from_dict
    from loraleak.zoo.build import build_zoo
    from loraleak.zoo.config import ZooConfig

    tiny_zoo_base().save_pretrained(work / "base", safe_serialization=True)
    cfg = from_dict(ZooConfig, {"root": str(work / "zoo"), "base": str(work / "base"),
                                "identities": TINY_ZOO_IDENTITIES, "finetune": TINY_ZOO_FINETUNE,
                                "num_snapshots": 2, "workers": 0, "tracking": False})
    assert build_zoo(cfg, show_progress=False)["done"] == 5
    return cfg


# --- one evaluation zoo: 6 identities, half held out (3 victims ranked among 3 candidates) --------------------
EVALUATION_IDENTITIES = {"kind": "synthetic", "num_identities": 6, "images_per_identity": 3, "heldout_fraction": 0.5}


def build_evaluation_zoo(work):
    """A random 16 px base (work/base) and a zoo of its 6 fine-tunes (work/zoo); returns the ZooConfig."""
    from loraleak.base.tiny import build_tiny_pipeline
    from loraleak.config import from_dict
    from loraleak.zoo.build import build_zoo
    from loraleak.zoo.config import ZooConfig

    build_tiny_pipeline(TINY).save_pretrained(work / "base", safe_serialization=True)
    cfg = from_dict(ZooConfig, {"root": str(work / "zoo"), "base": str(work / "base"),
                                "identities": EVALUATION_IDENTITIES,
                                "finetune": {"rank": 2, "alpha": 2, "steps": 4, "prior_preservation": False, "lr": 1e-2},
                                "num_snapshots": 2, "workers": 0, "tracking": False})
    assert build_zoo(cfg, show_progress=False)["done"] == 6
    return cfg


def save_untrained_attack(zoo, path, seed=None):
    """A network autoencoder for the zoo's LoRA layout, saved as `train_attack` saves one but not trained."""
    import torch

    from loraleak.attack.lora_inputs import lora_layout
    from loraleak.attack.model import NetworkAutoencoder
    from loraleak.base.loading import base_fingerprint, load_base_pipeline
    from loraleak.lora.io import read_lora
    from loraleak.zoo.manifest import read_manifest

    row = next(r for r in read_manifest(zoo.root).to_pylist() if r["snapshot_step"] == r["steps"])
    layout = lora_layout(read_lora(f"{zoo.root}/{row['lora_path']}")[0])
    if seed is not None:
        torch.manual_seed(seed)
    NetworkAutoencoder.from_pipeline(load_base_pipeline(zoo.base), layout,
                                     base_fingerprint=base_fingerprint(zoo.base)).save_pretrained(path)
    return path


# --- processes a test started, found by the folder their command lines name --------------------------------

def processes_naming(folder: str, wait_s: float = 0) -> list[psutil.Process]:
    """The processes whose command line names `folder`: a Ray session's temp folder (RAY_TMPDIR, --temp-dir)
    is passed to every process that Ray starts, so this finds one Ray instance's processes and no other.
    With `wait_s`, polls until none is left or wait_s has passed (a process stopped a moment ago may still
    be exiting) and returns what is left."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(folder in arg for arg in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)
