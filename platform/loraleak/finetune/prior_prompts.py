"""The prompts the prior-preservation images are shown with: the class prompt, and optionally wrong triggers.

DreamBooth's prior shows base samples with the class prompt ("A human face.") so that the class
keeps drawing the base. In SD 1.4 that is enough to tie the person to the trigger, because its
text encoder and UNet were trained on captions full of names: another rare word means something
else. A small base whose text encoder is random and frozen and whose captions never named anyone
cannot tell one unknown word from another, so a LoRA trained with the class prior alone learns the
*template* "A face of X." and draws its person for any X (measured in
../shared/docs/real-faces-on-cpu.md: a wrong trigger draws the victim as well as the true one).

`prior_negative_triggers` = N > 0 teaches the LoRA what SD's pretraining taught SD: a fraction
(`prior_negative_fraction`, default half) of the class rows are shown with the instance template
filled by one of N random *other* triggers, so
"another name -> the base" and only the victim's own trigger draws the person. The wrong triggers
are drawn from the fine-tune's seed in a stream of their own (they shift none of the recipe's
other draws), and rows cycle through them deterministically, the same in the single and the
batched fine-tune. N = 0 is the paper's prior, unchanged.
"""

from __future__ import annotations

import hashlib
import math
import random

import torch

from .config import FinetuneConfig
from .triggers import random_trigger


def negative_trigger(cfg: FinetuneConfig, index: int) -> str:
    """cfg's wrong trigger number `index` (0-based): fixed by (cfg.seed, index), never the true trigger."""
    true = cfg.trigger_word
    for attempt in range(100):
        digest = hashlib.sha256(f"prior-negative-trigger:{cfg.seed}:{index}:{attempt}".encode()).digest()
        word = random_trigger(random.Random(digest))
        if word != true:
            return word
    raise AssertionError("unreachable: 100 draws of a random word all equal the trigger")


def prior_prompt(cfg: FinetuneConfig, index: int) -> str:
    """Prompt `index` of the class rows' pool: 0 is the class prompt, i >= 1 the template with wrong trigger i - 1."""
    return cfg.class_prompt if index == 0 else cfg.instance_prompt.format(trigger=negative_trigger(cfg, index - 1))


def prior_prompt_indices(cfg: FinetuneConfig, step: int, rows: int) -> list[int]:
    """Pool indices of the `rows` class rows of `step` (1-based).

    Row positions p = (step - 1) * batch_size + c carry a wrong trigger when floor((p + 1) f) > floor(p f)
    for f = prior_negative_fraction (evenly spread: f = 0.5 alternates class prompt, wrong trigger), the
    class prompt otherwise; wrong triggers are taken in turn, so with N at least the number of such rows
    every wrong trigger is seen once — what makes the binding hold for triggers the fine-tune never saw
    (a small pool is memorised instead).
    """
    n, f = cfg.prior_negative_triggers, cfg.prior_negative_fraction
    if n == 0:
        return [0] * rows
    first = (step - 1) * cfg.batch_size
    return [1 + math.floor(p * f) % n if math.floor((p + 1) * f) > math.floor(p * f) else 0
            for p in range(first, first + rows)]


# Wrong-trigger rows embedded per text-encoder call: the rows of the next steps, so that one call
# replaces one per step (three rows a step at the quick profile's settings). Measured on one CPU
# thread (the tiny base's encoder): a few rows per call cost ~1.5x per row what 32-64 rows do, and
# much larger calls get slower per row again as their activations outgrow the caches; 64 rows of
# SD 1.4's 77x768 embeddings are 15 MB per fine-tune held ahead.
WRONG_ROWS_PER_CALL = 64


class PromptEmbeddings:
    """The frozen text encoder's embeddings of one fine-tune's prompts: the instance prompt, and each
    step's class rows. Fixed prompts are embedded once; wrong triggers a chunk of steps ahead, in one
    text-encoder call (`rows_per_call` rows at most, one step's rows at least)."""

    def __init__(self, tokenizer, text_encoder, cfg: FinetuneConfig, token_ids, encode,
                 rows_per_call: int = WRONG_ROWS_PER_CALL) -> None:
        if rows_per_call < 1:
            raise ValueError(f"rows_per_call must be >= 1, got {rows_per_call}")
        self.cfg, self.tokenizer, self.text_encoder = cfg, tokenizer, text_encoder
        self.token_ids, self.encode = token_ids, encode  # the fine-tune's own tokenise / embed helpers
        self.rows_per_call = rows_per_call
        # One batch of the step's rows, as the fine-tunes always embedded them: a text encoder's output for a
        # row can differ in its last bits with the batch's shape, and the paper's prior keeps its LoRAs exact.
        b = cfg.batch_size
        prompts = [cfg.instance_prompt_text] * b + ([cfg.class_prompt] * b if cfg.prior_preservation else [])
        with torch.no_grad():
            fixed = encode(text_encoder, torch.cat([token_ids(tokenizer, p) for p in prompts]))
        self.fixed, self.batch_size = fixed, b
        self.instance = fixed[:1]
        self.class_prompt = fixed[b:b + 1] if cfg.prior_preservation else None
        self._ahead: dict[tuple[int, int], torch.Tensor] = {}  # (step, rows) -> its wrong-trigger rows, embedded

    def step_rows(self, step: int, instance_rows: int) -> torch.Tensor:
        """(instance_rows + class rows, tokens, width): the embeddings of one step's rows, instance rows first."""
        if instance_rows == self.batch_size and not self.cfg.prior_negative_triggers:
            return self.fixed  # the paper's prior: the same rows every step
        rows = [self.instance.expand(instance_rows, -1, -1)]
        if self.class_prompt is not None:
            rows.append(self.class_rows(step, self.batch_size))
        return torch.cat(rows)

    def ids(self, index: int) -> torch.Tensor:
        return self.token_ids(self.tokenizer, prior_prompt(self.cfg, index))

    @torch.no_grad()
    def class_rows(self, step: int, rows: int) -> torch.Tensor:
        """(rows, tokens, width): the embeddings the class rows of `step` are conditioned on."""
        indices = prior_prompt_indices(self.cfg, step, rows)
        if not any(indices):
            return self.class_prompt.expand(rows, -1, -1)
        if (step, rows) not in self._ahead:
            self._embed_ahead(step, rows)
        embedded = iter(self._ahead.pop((step, rows)))
        return torch.stack([self.class_prompt[0] if i == 0 else next(embedded) for i in indices])

    def _embed_ahead(self, step: int, rows: int) -> None:
        """Embed the wrong-trigger rows of `step` and of the steps after it (up to the last step) in one call.

        The rows are those each step would embed on its own, in its order (prior_prompt_indices: the
        same wrong triggers, which depend on (seed, index) only); what is left of an earlier chunk is
        dropped (a caller that went back or changed its row count)."""
        wrong = [[i for i in prior_prompt_indices(self.cfg, step, rows) if i]]
        while step + len(wrong) <= self.cfg.steps:
            following = [i for i in prior_prompt_indices(self.cfg, step + len(wrong), rows) if i]
            if sum(map(len, wrong)) + len(following) > self.rows_per_call:
                break
            wrong.append(following)
        embedded = self.encode(self.text_encoder, torch.cat([self.ids(i) for part in wrong for i in part]))
        self._ahead = {(step + j, rows): part for j, part in enumerate(embedded.split([len(p) for p in wrong]))}
