"""One victim's evaluation: its images under every condition, scored against every candidate.

An `EvaluationWorker` (a Ray actor, or a plain object with `workers: 0`) loads the base pipeline,
the attacks and the scorer once and then takes victim after victim. For each it answers with the
scores and the images as PNG bytes; the driver writes them (`evaluate.py`), so the worker needs
no access to the output folder and a cluster node can run it.

Order matters in one place: the attacks read the LoRA *before* it is loaded into the pipeline,
because a LoRA with text-encoder factors would otherwise change the CLIP transformer that the
network autoencoder's encoder runs through.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from typing import Any, Mapping, Sequence

import diffusers
import torch
from PIL import Image

from ..attack.api import LoraInput
from ..attack.loading import load_attack
from ..base.attention import attention_processor
from ..base.loading import load_base_pipeline
from ..base.precision import warn_if_emulated_bf16
from ..errors import InputError
from ..finetune.class_images import pipeline_resolution
from ..finetune.loop import AMP_DTYPES
from ..finetune.triggers import random_trigger
from ..generate import generate_images, lora_loaded
from ..identities import image_sha256, make_source
from ..lora.io import loaded_adapters
from ..scoring import make_scorer
from ..zoo.storage import ZooStore
from .config import EvaluationConfig
from .image_cache import ImageCache, attack_code, condition_key, file_sha256, generation_context
from .metrics import score_images


def victim_seed(seed: int, source: str) -> int:
    """The seed of every condition of one victim: fixed by (seed, source), different across victims. `source`
    is the victim's lora_id, or its identity_id (EvaluationConfig.victim_noise)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:4], "big")


def wrong_trigger(seed: int, true_trigger: str) -> str:
    """A random trigger word that is not the victim's (drawn from the victim's seed)."""
    rng = random.Random(seed)
    while (word := random_trigger(rng)) == true_trigger:
        pass
    return word


def control_prompt(control: str, victim: Mapping[str, Any]) -> str:
    if control == "victim_class_prompt":
        return victim["class_prompt"]
    if control == "victim_empty_prompt":
        return ""
    if control == "victim_wrong_trigger":
        return victim["instance_template"].format(trigger=wrong_trigger(victim["seed"], victim["trigger"]))
    raise ValueError(f"unknown control {control!r}")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class EvaluationWorker:
    """Holds the base pipeline, the attacks and the scorer; `evaluate(victim)` does one victim.

    cfg: the evaluation's config with `base` and `identities` resolved (the zoo's) and paths absolute.
    references: candidate identity -> its private photos' embeddings (computed once by the driver).
    """

    def __init__(self, cfg: EvaluationConfig, references: Mapping[str, Sequence[Any]],
                 attack_keys: Mapping[str, str] | None = None, own_process: bool = True):
        if own_process:  # a Ray actor's process is the worker's alone to configure
            torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
            diffusers.utils.logging.disable_progress_bar()
        self.cfg, self.references = cfg, references
        # Ray gives a GPU worker its device(s) through CUDA_VISIBLE_DEVICES; "cuda" is the first.
        device = "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
        self.amp_dtype = AMP_DTYPES[cfg.mixed_precision]
        self.pipe = self._load_pipeline(device)
        self.resolution = pipeline_resolution(self.pipe)
        self.attacks = {}
        if cfg.attack is not None:
            self.attacks["rec"] = load_attack(cfg.attack, self.pipe)
        for name, directory in cfg.baselines.items():
            self.attacks[name] = load_attack(directory, self.pipe)
        self.scorer = make_scorer(cfg.scorer, cfg.scorer_path)
        self.identities = {i.identity_id: i for i in make_source(cfg.identities).identities()}
        # The image cache: attack_keys names each attack's saved folder by its content (the driver hashed them).
        self.cache = ImageCache(cfg.image_cache) if cfg.image_cache is not None else None
        self.context = generation_context(self.pipe, self.amp_dtype) if self.cache is not None else {}
        self.attack_code = attack_code() if self.cache is not None else ""
        self.attack_keys = dict(attack_keys or {})

    def _load_pipeline(self, device: str | torch.device) -> Any:
        """The base pipeline; under bf16 its UNet and VAE attend with the kernel that is fast in bf16 on this
        device (loraleak.base.attention: on a CPU, the unfused one)."""
        pipe = load_base_pipeline(self.cfg.base, device=device)
        warn_if_emulated_bf16(pipe.device, self.amp_dtype, "evaluation sampling")
        if self.amp_dtype is not None:
            for model in (pipe.unet, pipe.vae):
                model.set_attn_processor(attention_processor("auto", pipe.device, self.amp_dtype))
        return pipe

    def _sampling(self) -> Any:
        """The autocast every image of this worker is sampled under (none for mixed_precision 'no')."""
        return torch.autocast(self.pipe.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def evaluate(self, victim: Mapping[str, Any]) -> dict[str, Any]:
        """Images and scores of one victim; a failure is returned as {"error": ...}, never raised, so
        that one bad victim does not stop the others."""
        started = time.perf_counter()
        try:
            result = self._evaluate(victim)
        except Exception as e:  # noqa: BLE001 - reported per victim; the driver counts and shows it
            self._recover()
            text = " ".join(str(e).split()) or "(no message)"
            return {"lora_id": victim["lora_id"], "error": f"{type(e).__name__}: {text}"[:500]}
        result["wall_s"] = time.perf_counter() - started
        return result

    def _evaluate(self, victim: Mapping[str, Any]) -> dict[str, Any]:
        private = self._private_images(victim)
        with ZooStore(self.cfg.zoo).local_file(victim["lora_path"]) as lora_path:
            images, prompts, reused = self._images(victim, lora_path)
        # Scored from the PNGs (lossless): the same pixels whether generated now or read from the cache.
        scores = {name: score_images(self.scorer, [open_png(b) for b in pngs], self.references,
                                     victim["identity_id"]).to_dict()
                  for name, pngs in images.items()}
        return {"lora_id": victim["lora_id"], "identity_id": victim["identity_id"], "error": None,
                "scores": scores, "prompts": prompts, "images": images,
                "private": [png_bytes(im) for im in private],
                "image_sets": {"reused": len(reused), "generated": len(images) - len(reused)}}

    def _private_images(self, victim: Mapping[str, Any]) -> list[Image.Image]:
        """The photos the LoRA was fine-tuned on, checked against the hashes the zoo recorded."""
        identity = self.identities.get(victim["identity_id"])
        if identity is None:
            raise InputError(f"identity {victim['identity_id']!r} of the zoo is not in the identity source")
        images = identity.load(self.resolution)
        if [image_sha256(im) for im in images] != list(victim["image_hashes"]):
            raise InputError(f"the photos of {victim['identity_id']!r} differ from those its LoRA was "
                             "fine-tuned on (zoo manifest hashes); evaluate with the zoo's identity source")
        return images

    def _images(self, victim: Mapping[str, Any], lora_path) -> tuple[dict[str, list[bytes]], dict[str, str], set[str]]:
        """Every condition's images as PNG bytes, their prompts, and the conditions the image cache gave."""
        cfg = self.cfg
        sample = dict(n=cfg.n_images, seed=victim["seed"], num_inference_steps=cfg.sample_steps,
                      guidance_scale=cfg.guidance_scale)
        prompts = {"org": victim["instance_prompt"], "base": victim["class_prompt"],
                   **{c: control_prompt(c, victim) for c in cfg.controls}}
        images: dict[str, list[bytes]] = {}
        keys = self._keys(victim, lora_path, sample, prompts) if self.cache is not None else {}
        for name, key in keys.items():
            if (hit := self.cache.get(key)) is not None:
                images[name], prompts[name] = hit.images, hit.prompt
        reused = set(images)

        def generate(name: str, **text: Any) -> None:
            with self._sampling():
                images[name] = [png_bytes(im) for im in generate_images(self.pipe, **text, **sample)]

        missing = [name for name in self.attacks if name not in images]
        lora = LoraInput.from_file(lora_path, step=victim["step"]) if missing else None
        answers = {name: self.attacks[name].reconstruct(lora, cfg.n_images, victim["seed"])
                   for name in missing}  # before the LoRA touches the pipeline
        with_lora = [c for c in ("org", *cfg.controls) if c not in images]
        embedded = {name: a.prompt_embeds for name, a in answers.items() if a.prompt_embeds is not None}
        if with_lora or embedded:  # each call seeds its own noise: the order of the calls changes no image
            with lora_loaded(self.pipe, lora_path):
                for name in with_lora:
                    generate(name, prompt=prompts[name])
                for name, embeds in embedded.items():
                    generate(name, prompt_embeds=embeds)
                    prompts[name] = f"{name} z (prompt embedding from the LoRA weights)"
        for name, answer in answers.items():
            if answer.images is not None:
                images[name] = [png_bytes(im.convert("RGB")) for im in answer.images[: cfg.n_images]]
                prompts[name] = f"{name} images (returned by the attack)"
        if "base" not in images:
            generate("base", prompt=prompts["base"])
        for name, key in keys.items():
            if name not in reused:
                self.cache.put(key, images[name], prompts[name],
                               {"condition": name, "lora_id": victim["lora_id"], "prompt": prompts[name]})
        order = [c for c in cfg.conditions if c in images]
        return {c: images[c] for c in order}, {c: prompts[c] for c in order}, reused & set(order)

    def _keys(self, victim: Mapping[str, Any], lora_path, sample: Mapping[str, Any],
              prompts: Mapping[str, str]) -> dict[str, str]:
        """condition -> its image-cache key (`image_cache.condition_key`)."""
        lora = file_sha256(lora_path)
        keys = {name: condition_key(self.context, sample, lora=None if name == "base" else lora, prompt=text)
                for name, text in prompts.items()}
        for name in self.attacks:
            if name in self.attack_keys:  # an attack's images: its saved folder's content and the attack code
                keys[name] = condition_key(self.context, sample, lora=lora, step=victim["step"],
                                           attack=self.attack_keys[name], code=self.attack_code)
        return keys

    def _recover(self) -> None:
        """Leave the pipeline clean for the next victim after one failed midway."""
        if loaded_adapters(self.pipe):
            self.pipe = self._load_pipeline(self.pipe.device)


def victim_record(row: Mapping[str, Any], seed: int, noise: str = "lora") -> dict[str, Any]:
    """A manifest row (a final snapshot) as the plain mapping a worker evaluates; its seed drawn from its
    lora_id (noise "lora") or its identity ("identity")."""
    finetune = json.loads(row["finetune_config"] or "{}")
    return {"lora_id": row["lora_id"], "identity_id": row["identity_id"], "lora_path": row["lora_path"],
            "step": row["snapshot_step"], "steps": row["steps"], "rank": row["rank"],
            "instance_prompt": row["instance_prompt"], "class_prompt": row["class_prompt"],
            "trigger": row["trigger"], "instance_template": finetune.get("instance_prompt", "A face of {trigger}."),
            "image_hashes": list(row["image_hashes"]), "seed": victim_seed(seed, row["identity_id" if noise == "identity" else "lora_id"])}
