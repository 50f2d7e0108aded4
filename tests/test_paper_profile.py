"""`--profile paper` end to end on SD 1.4's shapes, on a CPU: the paper path before anyone pays for GPUs.

The base is SD 1.4's architecture with random weights (`loraleak base sd14-shaped`, 64 px: the same
parameter shapes as at 512 px, 8x8 latents), the identities are 4 synthetic ones (the fewest the
profile accepts: 2 held out to identify among, 2 attack-train LoRAs for the PCA map), every stage runs a few steps, and the scorer is facenet (the paper's
metric) with random weights. Everything else is the profile as it ships: UNet LoRA r16 alpha 27 on
to_q/to_v, the text-encoder LoRA r16 alpha 17, the attack with the frozen CLIP-L text encoder and
the step embedding, the three baselines, evaluation, report; then the same study with DP-SGD on the
victim fine-tune (which privatises the UNet LoRA only: text-encoder LoRA off, as dp_sgd requires).
Only sizes and devices change, by overrides (the `--set` of `loraleak run`).

Slow (minutes of CPU, ~4 GB of weights per process that loads the base): `pytest -m slow
tests/test_paper_profile.py`. Set LORALEAK_SD14_SHAPED to a folder `loraleak base sd14-shaped
--resolution 64` wrote to skip building one (about 1 min, 4.3 GB of disk).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from loraleak.base.sd14_shaped import SD14_PARAMETERS, SD14ShapedConfig, save_sd14_shaped
from loraleak.lora.io import lora_factors, lora_provenance, lora_summary, read_lora
from loraleak.pipeline.api import load_pipeline_config, run_study
from loraleak.scoring.facenet_net import InceptionResnetV1

pytestmark = [pytest.mark.slow, pytest.mark.sd14]

MIN_FREE_RAM_GB = 16  # the driver, a zoo worker and an evaluation worker can each hold the 4.3 GB base
MIN_FREE_DISK_GB = 12  # the base (4.3 GB) and the study's folders


def _available_ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.fixture(scope="module")
def roomy(tmp_path_factory) -> Path:
    ram = _available_ram_gb()
    if ram < MIN_FREE_RAM_GB:
        pytest.skip(f"the paper profile on SD 1.4's shapes needs {MIN_FREE_RAM_GB} GB of free RAM; "
                    f"this machine has {ram:.1f} GB available")
    root = tmp_path_factory.mktemp("paper")
    disk = shutil.disk_usage(root).free / 2**30
    if disk < MIN_FREE_DISK_GB:
        pytest.skip(f"needs {MIN_FREE_DISK_GB} GB of free disk under {root}; {disk:.1f} GB free")
    return root


@pytest.fixture(scope="module")
def sd14_base(roomy) -> Path:
    given = os.environ.get("LORALEAK_SD14_SHAPED")
    if given:
        return Path(given)
    out = roomy / "sd14-64"
    assert save_sd14_shaped(out, SD14ShapedConfig(resolution=64)) == SD14_PARAMETERS
    return out


@pytest.fixture(scope="module")
def facenet_weights(roomy) -> Path:
    torch.manual_seed(0)
    path = roomy / "facenet-random.pt"
    torch.save(InceptionResnetV1().state_dict(), path)
    return path


def cpu_sizes(base: Path, facenet: Path) -> dict[str, object]:
    """What `loraleak run --profile paper` needs on a CPU: sizes, devices, one worker per stage."""
    return {
        "base.ref": str(base),
        "identities.kind": "synthetic", "identities.num_identities": 4, "identities.heldout_fraction": 0.5,
        "zoo.finetune.steps": 4, "zoo.finetune.num_class_images": 2, "zoo.finetune.class_inference_steps": 2,
        "zoo.finetune.device": "cpu", "zoo.num_snapshots": 2,
        "zoo.workers": 1, "zoo.num_cpus_per_worker": 1, "zoo.num_gpus_per_worker": 0,
        "attack.max_steps": 2, "attack.batch_size": 1, "attack.mixed_precision": "no", "attack.use_gpu": False,
        "attack.num_workers": 1, "attack.resources_per_worker": None, "attack.loader_workers": 0,
        "attack.checkpoint_every": 1, "attack.val_every": 1, "attack.val_fraction": 0,
        # The paper's baselines; matching model updates with 2 inversion steps on 1 dummy image at 2 timesteps
        # (its 200 double-backward steps through SD 1.4's UNet take about an hour per victim on a CPU core).
        "baselines": [{"name": "nearest_neighbour", "kind": "nearest_neighbour", "settings": {}},
                      {"name": "pca_map", "kind": "pca_map", "settings": {"components": 32}},
                      {"name": "matching_updates", "kind": "matching_updates",
                       "settings": {"steps": 2, "num_images": 1, "timesteps": [250, 750]}}],
        "evaluation.scorer": "facenet", "evaluation.scorer_path": str(facenet),
        "evaluation.n_images": 1, "evaluation.sample_steps": 2, "evaluation.workers": 1,
        "evaluation.num_cpus_per_worker": 1, "evaluation.num_gpus_per_worker": 0,
    }


def final_loras(zoo: Path) -> list[Path]:
    files = sorted(p for p in zoo.rglob("*.safetensors") if "class" not in p.parts[-2])
    assert files, f"no LoRA files under {zoo}"
    return files


def test_paper_profile_end_to_end_on_sd14_shapes(roomy, sd14_base, facenet_weights):
    overrides = cpu_sizes(sd14_base, facenet_weights)
    cfg = load_pipeline_config("paper", out=roomy / "study", overrides=overrides)
    # The paper's settings are the profile's, untouched.
    ft = cfg.zoo.finetune
    assert (ft.rank, ft.alpha, ft.targets, ft.train_text_encoder, ft.text_rank, ft.text_alpha) == \
        (16, 27, ("to_q", "to_v"), True, 16, 17)
    assert cfg.attack.model.step_embedding and cfg.attack.snapshots == "all"

    result = run_study(cfg, show_progress=False)

    # The victims' LoRAs have SD 1.4's shapes: 32 attention modules x (to_q, to_v) in the UNet, the
    # 12 CLIP-L layers x (q_proj, v_proj) in the text encoder, rank 16.
    zoo = Path(result.stage_dirs["zoo"])
    loras = final_loras(zoo)
    state, meta = read_lora(loras[-1])
    summary = lora_summary(state, meta)
    assert summary["rank"] == 16 and summary["targets"] == ["to_q", "to_v"]
    assert len(summary["unet_modules"]) == 64 and len(summary["text_encoder_modules"]) == 24
    downs = {tuple(down.shape) for down, _ in lora_factors(state, "unet").values()}
    assert downs == {(16, 320), (16, 640), (16, 1280), (16, 768)}  # self-attention in C, cross-attention's to_v in 768
    assert {(tuple(d.shape), tuple(u.shape)) for d, u in lora_factors(state, "text_encoder").values()} == \
        {((16, 768), (768, 16))}
    provenance = lora_provenance(meta, loras[-1])
    assert provenance is not None and provenance.alpha == 27 and provenance.rank == 16

    # Attack, baselines, evaluation and report ran; every condition was scored by facenet.
    for condition in ("org", "rec", "base", "nearest_neighbour", "pca_map", "matching_updates",
                      "victim_wrong_trigger"):
        assert 0.0 <= result.metrics[f"{condition}.similarity"] <= 1.0, condition
        assert result.metrics[f"{condition}.face_found"] == 1.0, condition  # facenet embeds every crop
    assert result.report.is_file()
    assert result.metrics["chance_top1"] == pytest.approx(0.5)

    # DP-SGD on the victim fine-tune (UNet LoRA only), attacked by an attack retrained on its zoo.
    dp = load_pipeline_config("paper", out=roomy / "study-dp", overrides={
        **overrides, "zoo.defense": {"kind": "dp_sgd", "epsilon": 8.0},
        "zoo.finetune.train_text_encoder": False, "undefended_attack": False})
    dp_result = run_study(dp, show_progress=False)
    dp_state, dp_meta = read_lora(final_loras(Path(dp_result.stage_dirs["zoo"]))[-1])
    dp_summary = lora_summary(dp_state, dp_meta)
    assert len(dp_summary["unet_modules"]) == 64 and not dp_summary["text_encoder_modules"]
    assert 0.0 <= dp_result.metrics["rec.similarity"] <= 1.0
