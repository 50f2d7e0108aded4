"""`loraleak run --profile NAME`: the packaged study configs (loraleak/configs/pipeline-*.yaml).

Its own module, importing nothing of the stages: the CLI's parser and the sweeps' config checks
name the profiles without loading torch.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PROFILES = {"quick": "pipeline-quick.yaml", "lfw": "pipeline-lfw.yaml", "paper": "pipeline-paper.yaml"}


def profile_path(name: str) -> Path:
    """The packaged PipelineConfig file of profile `name` (a key of PROFILES)."""
    return Path(str(files("loraleak") / "configs" / PROFILES[name]))
