import os
from pathlib import Path

import pytest
import torch

# Tests share 2 cores with whatever else runs; one thread keeps timings predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
LFW = SHARED / "datasets" / "lfw"


@pytest.fixture
def lfw_root() -> Path:
    if not (LFW / "private").is_dir():
        pytest.skip(f"real-face data not found at {LFW} (../shared beside the repository)")
    return LFW


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (start-up costs seconds); left running if already up."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
