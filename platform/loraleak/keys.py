"""`content_key(data, chars)`: the one content hash of settings in the code base.

SHA-256 of the data's canonical JSON (keys sorted, anything JSON cannot write as its `str`), cut to
`chars` hex digits. It names what is derived from those settings and nothing else: a stage's folder
(`zoo-<key>`), a LoRA (`lora_id`), a sweep's trial, a set of class images. The same settings give
the same key on every machine and in every run, so a key is how a rerun finds its earlier output,
and changing this function renames every output there is (tests/test_pipeline_stages.py pins it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(data: Any, chars: int) -> str:
    """The first `chars` hex digits of the SHA-256 of `data` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:chars]
