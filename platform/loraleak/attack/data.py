"""The attack's training data, streamed from a LoRA zoo one file at a time.

    select_samples(cfg)   the manifest rows to train and validate on (attack_train split only)
    LoraSamples           endless shuffled epochs of one worker's shard; each LoRA file read when reached
    collate_samples       -> LoraBatch: encoder inputs, stacked victim factors, scales, steps, identities
    ImageLatents          each identity's private images, encoded once by the base VAE (LRU cache)
    PromptEmbeddings      each fine-tune's true instance-prompt embedding (the optional MSE target)

The zoo's `iter_zoo_samples` gives Δθ_r only; decoding through the victim needs θ_r itself (and the
file's alpha for the LoRA scale), so samples are read here from `sample_rows`' paths.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import InputError
from ..lora.io import adapter_metadata, read_lora
from ..identities import IdentitiesConfig, Identity, image_sha256, make_source, split_identities
from ..imaging import center_crop_resize, to_tensor
from ..zoo.reader import sample_rows
from ..zoo.storage import ZooStore
from ..lora.batched import lora_scale, stack_lora_factors
from .config import AttackTrainConfig
from .lora_inputs import InputMode, LoraLayout, collate_lora_matrices, lora_layout, lora_matrices

CACHED_IDENTITIES = 2048  # ~1.3 GB of SD 1.4 latents (5 images each) at most, per worker
CACHED_PROMPTS = 2048


class SampleRow(NamedTuple):
    """One stored snapshot: the LoRA θ_r of a fine-tune at step r, and whose images it learned."""

    lora_id: str
    identity_id: str
    step: int  # r
    steps: int  # the fine-tune's length
    lora_path: str  # relative to the zoo root
    initial_path: str  # its θ_0
    instance_prompt: str
    image_hashes: tuple[str, ...]


@dataclass(frozen=True)
class ZooSelection:
    train: list[SampleRow]
    val: list[SampleRow]
    layout: LoraLayout
    base_hash: str
    lora_steps: int  # the usual fine-tune length: r for a shared LoRA that does not say its own
    train_identities: int
    val_identities: int
    lora_alpha: float | None = None  # the zoo's LoRA alpha (a shared LoRA of another rank is adapted to it)


def read_state(store: ZooStore, relative: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with store.local_file(relative) as local:
        return read_lora(local)


def training_identities(candidates: list[str], limit: int | None, zoo: str) -> set[str]:
    """The identities the attack trains on: all `candidates`, or the first `limit` of one fixed order of them
    (seed 0), so that the training sets of a learning curve are nested."""
    if limit is None:
        return set(candidates)
    if limit > len(candidates):
        raise InputError(f"attack.train_identities is {limit}, but zoo {zoo} has {len(candidates)} attack_train "
                         "identities for training (after validation)")
    order = sorted(candidates)
    random.Random(0).shuffle(order)
    return set(order[:limit])


def select_samples(cfg: AttackTrainConfig, base_hash: str | None = None) -> ZooSelection:
    """The attack_train rows of the zoo, split by identity into training and validation.

    `base_hash` (the fingerprint of cfg.base) must be the zoo's. Validation takes the final
    snapshots of `val_fraction` of the identities, whatever `snapshots` says: the attack's target.
    """
    table = sample_rows(cfg.zoo, split="attack_train", rank=cfg.rank)
    if table.num_rows == 0:
        raise InputError(f"zoo {cfg.zoo} has no finished attack_train LoRAs"
                         + (f" of rank {cfg.rank}" if cfg.rank is not None else ""))
    shapes = {(r["rank"], tuple(r["targets"]), r["base_hash"])
              for r in table.select(["rank", "targets", "base_hash"]).to_pylist()}
    if len(shapes) > 1:
        raise InputError(f"zoo {cfg.zoo} mixes LoRA shapes (rank, targets, base) {sorted(shapes)}: one attack "
                         "reads one layout; set rank")
    (_, _, zoo_base), = shapes
    if base_hash is not None and base_hash != zoo_base:
        raise InputError(f"base {cfg.base!r} (fingerprint {base_hash}) is not the base the zoo was fine-tuned "
                         f"from (fingerprint {zoo_base})")
    rows = [SampleRow(r["lora_id"], r["identity_id"], r["snapshot_step"], r["steps"], r["lora_path"],
                      r["initial_path"], r["instance_prompt"], tuple(r["image_hashes"]))
            for r in table.to_pylist()]

    identities = sorted({row.identity_id for row in rows})
    val_ids: set[str] = set()
    if cfg.val_fraction > 0:
        if len(identities) < 2:
            raise InputError(f"zoo {cfg.zoo} has {len(identities)} attack_train identity: validation needs 2 or "
                             "more (or val_fraction: 0)")
        # Seed 0, not cfg.seed: runs that differ in their seed are validated on the same identities.
        roles = split_identities(identities, cfg.val_fraction, seed=0)
        val_ids = {i for i, role in roles.items() if role == "heldout"}
    train_ids = training_identities([i for i in identities if i not in val_ids], cfg.train_identities, cfg.zoo)
    train = [r for r in rows if r.identity_id in train_ids and (cfg.snapshots == "all" or r.step == r.steps)]
    val = [r for r in rows if r.identity_id in val_ids and r.step == r.steps][: cfg.val_max_samples]
    if len(train) < cfg.num_workers:
        raise InputError(f"zoo {cfg.zoo} gives {len(train)} training samples, fewer than the {cfg.num_workers} "
                         "workers")
    store = ZooStore(cfg.zoo)
    first, first_metadata = read_state(store, train[0].lora_path)
    layout = lora_layout(first)
    lora_steps = Counter(r.steps for r in rows).most_common(1)[0][0]
    return ZooSelection(train, val, layout, zoo_base, lora_steps, len(train_ids), len(val_ids),
                        adapter_metadata(first_metadata).get("unet.lora_alpha"))


# ---------------------------------------------------------------------------------------------
# LoRA samples


@dataclass
class LoraSample:
    matrices: list[torch.Tensor]  # the encoder's inputs, in layout order
    state_dict: dict[str, torch.Tensor]  # θ_r: the victim's LoRA, to decode through
    scale: float  # alpha / rank, as diffusers applies it
    step: int
    row: SampleRow


@dataclass
class LoraBatch:
    matrices: list[torch.Tensor]  # per layout matrix: (N, rank, length)
    steps: torch.Tensor  # (N,) fine-tuning steps r
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A: N,r,in; B: N,out,r)
    scales: torch.Tensor  # (N,)
    rows: list[SampleRow]

    def __len__(self) -> int:
        return len(self.rows)


def load_sample(store: ZooStore, row: SampleRow, mode: InputMode, use_initial: bool,
                layout: LoraLayout) -> LoraSample:
    state_dict, metadata = read_state(store, row.lora_path)
    initial = read_state(store, row.initial_path)[0] if mode == "delta" and use_initial else None
    try:
        matrices = lora_matrices(state_dict, mode, initial, layout)
    except InputError as e:
        raise InputError(f"zoo LoRA {row.lora_path}: {e}") from None
    return LoraSample(matrices, state_dict, lora_scale(metadata), row.step, row)


def collate_samples(samples: Sequence[LoraSample]) -> LoraBatch:
    return LoraBatch(
        matrices=collate_lora_matrices([s.matrices for s in samples]),
        steps=torch.tensor([s.step for s in samples]),
        factors=stack_lora_factors([s.state_dict for s in samples]),
        scales=torch.tensor([s.scale for s in samples], dtype=torch.float32),
        rows=[s.row for s in samples],
    )


class LoraSamples(IterableDataset):
    """This worker's share of `rows`, epoch after epoch, from sample `start` on.

    Epoch e is a permutation drawn from (seed, e) alone; rank k of `world_size` takes every
    world_size-th entry, cut to the same length on every rank (so all ranks step together). The
    position in the stream is a function of the samples consumed: a resumed run continues exactly
    where the checkpointed one was. DataLoader processes split the stream round-robin, the order in
    which the DataLoader reads them back, so the order does not depend on how many there are.
    """

    def __init__(self, root: str, rows: Sequence[SampleRow], load: Callable[[ZooStore, SampleRow], LoraSample],
                 seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.per_rank = len(rows) // world_size
        if self.per_rank < 1:
            raise InputError(f"{len(rows)} samples cannot be shared by {world_size} workers")
        self.root, self.rows, self.load = root, list(rows), load
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start

    def order(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            permutation = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))
            mine = permutation[self.rank::self.world_size][: self.per_rank]
            yield from mine[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[LoraSample]:
        info = get_worker_info()
        process, processes = (info.id, info.num_workers) if info is not None else (0, 1)
        store = ZooStore(self.root)
        for position, index in enumerate(self.order()):
            if position % processes == process:
                yield self.load(store, self.rows[index])


# ---------------------------------------------------------------------------------------------
# The victims' images and prompts


class _LRU(OrderedDict):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value

    def lookup(self, key: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


def private_images(identities: dict[str, Identity], row: SampleRow, resolution: int) -> list[Image.Image]:
    """The images a zoo LoRA was fine-tuned on, checked against the hashes the zoo recorded (other
    images would train the attack on the wrong person)."""
    identity = identities.get(row.identity_id)
    if identity is None:
        raise InputError(f"identity {row.identity_id!r} of the zoo is not in the configured identity source; "
                         "set identities to the zoo's")
    images = identity.load(resolution)
    if tuple(image_sha256(im) for im in images) != row.image_hashes:
        raise InputError(f"the images of identity {row.identity_id!r} differ from those its LoRA was fine-tuned "
                         "on (hashes in the zoo manifest); set identities to the zoo's")
    return images


def check_identity_source(cfg: AttackTrainConfig, selection: ZooSelection, resolution: int) -> None:
    """Fail at once, not on a worker, when the configured identities are not the zoo's."""
    identities = {i.identity_id: i for i in make_source(cfg.identities).identities()}
    for row in (selection.train + selection.val)[:1]:
        private_images(identities, row, resolution)


class ImageLatents:
    """Scaled VAE latents of the victims' private images.

    Each identity's images are loaded from the identity source the zoo was built from, checked
    against the hashes the zoo recorded (other images would train the attack on the wrong person),
    and encoded once: the posterior mean and std stay cached on the CPU, and each draw samples
    mean + std · ε, which is exactly `vae.encode(x).latent_dist.sample()` without re-encoding.
    """

    def __init__(self, vae: Any, identities: IdentitiesConfig, resolution: int, device: torch.device) -> None:
        self.vae, self.resolution, self.device = vae, resolution, device
        self.identities = {i.identity_id: i for i in make_source(identities).identities()}
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.scale = float(vae.config.scaling_factor)
        self.cache = _LRU(CACHED_IDENTITIES)

    @torch.no_grad()
    def posterior(self, row: SampleRow) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.cache.lookup(row.identity_id)
        if cached is not None:
            return cached
        images = private_images(self.identities, row, self.resolution)
        pixels = to_tensor([center_crop_resize(im, self.resolution) for im in images])
        means, stds = [], []
        for part in pixels.split(8):
            dist = self.vae.encode(part.to(self.device, self.vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return self.cache.put(row.identity_id, (torch.cat(means), torch.cat(stds)))

    def sample(self, rows: Sequence[SampleRow], copies: int, generator: torch.Generator) -> torch.Tensor:
        """(copies · N, C, h, w): latent j is a random image of sample j mod N's identity."""
        latents = []
        for _ in range(copies):
            for row in rows:
                mean, std = self.posterior(row)
                pick = int(torch.randint(mean.shape[0], (1,), generator=generator))
                eps = torch.randn(mean.shape[1:], generator=generator)
                latents.append((mean[pick] + std[pick] * eps - self.shift) * self.scale)
        return torch.stack(latents).to(self.device)


class PromptEmbeddings:
    """The text embedding of each fine-tune's true instance prompt ("A face of {trigger}.")."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.cache = _LRU(CACHED_PROMPTS)

    @torch.no_grad()
    def __call__(self, rows: Sequence[SampleRow]) -> torch.Tensor:
        missing = sorted({r.instance_prompt for r in rows if r.instance_prompt not in self.cache})
        if missing:
            embeds = self.pipe.encode_prompt(missing, self.device, 1, False)[0].float().cpu()
            for prompt, embed in zip(missing, embeds):
                self.cache.put(prompt, embed)
        return torch.stack([self.cache.lookup(r.instance_prompt) for r in rows]).to(self.device)

