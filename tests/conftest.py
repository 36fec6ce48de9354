"""Test-wide settings: no hub access, a persistent model cache, the shared data folder."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: where the model fixtures live: "cpu" (CI), or "cuda" to run the mechanics on a GPU box
#: (``PFL_TEST_DEVICE=cuda ./dev test tests/test_oppu.py ...``); tests that load the tiny
#: model themselves without a device follow ``auto``, i.e. CUDA when present.
TEST_DEVICE = os.environ.get("PFL_TEST_DEVICE", "cpu")

#: ../shared/data beside the checkout (the team's reference data; never committed here).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUFFPOST = SHARED_DATA / "huffpost"


@pytest.fixture(scope="session")
def test_device() -> str:
    """The device the model fixtures use (``PFL_TEST_DEVICE``, default cpu)."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def huffpost_dir() -> Path:
    if not (HUFFPOST / "News_Category_Dataset_v3.jsonl").is_file():
        pytest.skip(f"HuffPost data not found at {HUFFPOST} (it lives in ../shared/data)")
    return HUFFPOST


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory) -> Path:
    """One cache of exported ONNX graphs for the whole session: exporting even the tiny model
    takes ~25 s on 2 cores, and several tests answer with its graph."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama with SmolLM2's tokenizer (shared, frozen: do not modify it)."""
    from shared.models import load_model

    return load_model("tiny", device=TEST_DEVICE)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (shared, frozen: do not modify it)."""
    from shared.models import load_model

    return load_model("smollm2-135m", device=TEST_DEVICE)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny matmuls are far faster on one thread, above
    all on a shared 2-core machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: every method the serving engine answers (shared.serving)
SERVED_METHODS = ("nonpersonalized", "lora-c", "lora-p", "oppu", "perpcs", "perfit", "perfit-c")


@pytest.fixture(scope="session")
def small_world(tiny):
    """A small world on the tiny model for the serving tests (test_serving,
    test_inference_service), built once: 8 synthetic users (2 targets, 2 sharers, 2
    collective), short training, every served method prepared and each target personalized.
    ``(runtime, roles, {(method, user id): (core, state)})``; read it, do not change it."""
    methods = SERVED_METHODS
    from shared.data import load_dataset
    from shared.methods import parse_method
    from shared.methods.base import PromptAugmentation, Runtime

    dataset = load_dataset("synthetic", None, num_users=8, seed=0)
    users = [dataset.user(i) for i in range(8)]
    roles = {"targets": users[:2], "sharers": users[2:4], "collective": users[4:6]}
    options = {"max_history": 6, "stage1": {"max_steps": 3, "lr": 2e-2},
               "oppu": {"max_steps": 3, "lr": 2e-2}, "perfit": {"lr": 2e-2},
               "perpcs": {"gate_steps": 2, "gate_lr": 1e-2}, "stage1_epochs": 1,
               "personal_epochs": 1}
    runtime = Runtime(loaded=tiny, task=dataset.task, seed=0, progress=False, options=options,
                      roles=roles)
    states = {}
    for name in methods:
        spec = parse_method(name)
        core = spec.make_core()
        core.prepare(runtime, dataset, spec.augmentation)
        for user in roles["targets"]:
            states[(name, user.id)] = (core, core.personalize(runtime, user,
                                                              PromptAugmentation(), None))
    return runtime, roles, states


# ------------------------------------------------------------------------ kinds of tests
#: Files whose tests start real processes (a SuperLink, SuperNodes, a Ray cluster, services
#: in processes of their own) or time whole runs: ``integration``.
INTEGRATION_FILES = {"test_deployment.py", "test_deploy_docs.py", "test_ray_cluster.py",
                     "test_interrupt.py", "test_bench.py", "test_study.py", "test_privacy.py",
                     "test_docs.py"}
#: Words in a test's name that mean it runs a federation on Flower's engine (Ray).
ENGINE_WORDS = ("ray", "flowers_engine")


def pytest_collection_modifyitems(config, items):
    """Mark every test by kind: ``real_model`` (it uses SmolLM2 or the HuffPost data),
    ``integration`` (:data:`INTEGRATION_FILES`, a federation on Ray, or an exported ONNX
    graph), ``unit`` (the rest, on the tiny model in this process). ``./dev test --fast``
    runs the unit tests."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"smollm2", "huffpost_dir"} or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.real_model)
        if item.path.name in INTEGRATION_FILES or "onnx_cache" in fixtures or any(
                word in item.name.lower() for word in ENGINE_WORDS):
            item.add_marker(pytest.mark.integration)
        if not (item.get_closest_marker("real_model") or item.get_closest_marker("integration")):
            item.add_marker(pytest.mark.unit)
