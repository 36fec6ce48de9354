"""Test-wide settings: no hub access, a persistent model cache, the shared data folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: ../shared/data beside the checkout (the team's reference data; never committed here).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUFFPOST = SHARED_DATA / "huffpost"


@pytest.fixture(scope="session")
def huffpost_dir() -> Path:
    if not (HUFFPOST / "News_Category_Dataset_v3.jsonl").is_file():
        pytest.skip(f"HuffPost data not found at {HUFFPOST} (it lives in ../shared/data)")
    return HUFFPOST


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama with SmolLM2's tokenizer (shared, frozen: do not modify it)."""
    from shared.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (shared, frozen: do not modify it)."""
    from shared.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny matmuls are far faster on one thread, above
    all on a shared 2-core machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
