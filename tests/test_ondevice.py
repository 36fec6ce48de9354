"""On-device inference with ONNX Runtime (edge_client.ondevice): one exported graph answers
every method's rows with the same greedy tokens as the PyTorch engine, and logits within a
stated tolerance; the export is cached; bad rows are refused.

Rows come from every method personalized on the tiny model (tests/conftest.py small_world).
Tokens are compared on the float32 graph (what a device runs) and, where rounding could flip
a near-tie, also on a float64 export of a float64 copy of the model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edge_client.ondevice.export import describe, exported_graph, graph_file
from edge_client.ondevice.runtime import OnnxEngine
from shared.errors import PflError
from shared.methods.perpcs.pieces import LoraUpdate
from shared.models import LoadedModel
from shared.prompts import encode_prompt
from shared.serving.engine import BatchedEngine
from shared.serving.rows import RowAdapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: largest |logit difference| allowed between ONNX Runtime and PyTorch, float32
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def rows(tiny, small_world):
    """Every (method, user) row with one of the targets' real prompts each."""
    runtime, roles, states = small_world
    prompts = [encode_prompt(tiny.tokenizer, q.input, 256) for u in roles["targets"]
               for q in u.queries]
    out = []
    for i, (key, (core, state)) in enumerate(sorted(states.items())):
        out.append((key, prompts[i % len(prompts)], core.serving_adapter(runtime, state)))
    return out


@pytest.fixture(scope="module")
def graph(tiny, onnx_cache):
    return exported_graph(tiny, cache=onnx_cache, progress=lambda message: None), onnx_cache


def test_every_method_gives_pytorchs_tokens_and_logits(tiny, rows, graph):
    path, _ = graph
    prompts, adapters = [p for _, p, _ in rows], [a for _, _, a in rows]
    assert {name for (name, _), _, _ in rows} >= {"oppu", "perpcs", "perfit", "lora-c"}
    run = dict(max_new_tokens=8, min_new_tokens=8)  # the tiny model stops at once else
    with BatchedEngine(tiny.model, tiny.tokenizer) as torch_engine:
        expected = torch_engine.generate(prompts, adapters, **run)
        expected_logits = torch_engine.last_logits(prompts, adapters).numpy()
    with OnnxEngine(path, tiny.tokenizer, threads=1) as engine:
        got = engine.generate(prompts, adapters, **run)
        logits = engine.last_logits(prompts, adapters)
        alone = [engine.generate([p], [a], **run)[0] for p, a in zip(prompts, adapters)]
    assert np.abs(logits - expected_logits).max() < LOGIT_TOLERANCE
    assert got == expected == alone
    assert all(len(tokens) == 8 for tokens in got)
    # the rows differ: personalization reaches the graph through its inputs
    assert len({tuple(np.round(row, 4)) for row in logits[:, :64]}) > len(rows) // 2


def test_float64_graph_agrees_to_rounding(tiny, rows, tmp_path):
    model64 = copy.deepcopy(tiny.model).double().eval()
    loaded = LoadedModel("tiny", model64, tiny.tokenizer, torch.device("cpu"))
    path = exported_graph(loaded, cache=tmp_path, progress=lambda message: None)
    rows64 = [(p, _double(a)) for _, p, a in rows]
    prompts, adapters = [p for p, _ in rows64], [a for _, a in rows64]
    with BatchedEngine(model64, tiny.tokenizer) as torch_engine:
        expected = torch_engine.last_logits(prompts, adapters).double().numpy()
        tokens = torch_engine.generate(prompts, adapters, max_new_tokens=6, min_new_tokens=6)
    with OnnxEngine(path, tiny.tokenizer, threads=1) as engine:
        assert engine.dtype == np.float64
        # PyTorch applies PerFit's stages in float32 (the stages' own dtype), the graph in
        # float64: that, not the graph, bounds the difference
        assert np.abs(engine.last_logits(prompts, adapters) - expected).max() < 1e-5
        assert engine.generate(prompts, adapters, max_new_tokens=6, min_new_tokens=6) == tokens


def _double(adapter):
    if adapter is None:
        return None
    updates = {k: LoraUpdate(u.A.double(), u.B.double()) for k, u in adapter.updates.items()}
    return RowAdapter(updates, adapter.intervention, adapter.name)


def test_the_export_is_kept_and_described(tiny, graph):
    path, cache = graph
    before = path.stat().st_mtime_ns
    again = exported_graph(tiny, cache=cache, progress=lambda message: None)
    assert again == path and path.stat().st_mtime_ns == before  # read back, not exported
    info = describe(path)
    assert info["model"] == "tiny" and info["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert info["layers"] == tiny.model.config.num_hidden_layers
    assert (path.parent / "model.onnx.data").is_file()
    with pytest.raises(PflError, match="quantization"):
        graph_file(path.parent, "int3")


def test_rows_the_graph_cannot_carry_are_refused(tiny, graph):
    path, _ = graph
    d = tiny.model.config.hidden_size
    with OnnxEngine(path, tiny.tokenizer, threads=1) as engine:
        mlp = RowAdapter({(0, "up_proj"): LoraUpdate(torch.zeros(2, d), torch.zeros(128, 2))})
        with pytest.raises(PflError, match="--modules"):
            engine.generate([[1, 2, 3]], [mlp])
        wrong = RowAdapter({(0, "q_proj"): LoraUpdate(torch.zeros(2, d + 1),
                                                      torch.zeros(d, 2))})
        with pytest.raises(PflError, match="shapes"):
            engine.generate([[1, 2, 3]], [wrong])
        bad = RowAdapter({(0, "q_proj"): LoraUpdate(torch.full((2, d), float("nan")),
                                                    torch.zeros(d, 2))})
        with pytest.raises(PflError, match="non-finite"):
            engine.last_logits([[1, 2, 3]], [bad])
        with pytest.raises(PflError, match="empty prompt"):
            engine.generate([[]], [None])


#: Decoder layers of SmolLM2 kept for its graph test: its shapes (GQA, 576 wide, 49k vocab),
#: weights and tokenizer, at 4 of its 30 layers, whose export takes a seventh of the time
#: (the whole model: 270 s of a 2-core CI run). The whole depth is checked by ``pfl eval
#: --backend onnx`` against ``--backend torch`` (simulations/reports/ondevice/quality.md:
#: fp32 gives PyTorch's answers on 120 of 120 news-headline queries).
SMOLLM2_LAYERS = 4


@pytest.fixture(scope="module")
def smollm2_head(smollm2):
    """SmolLM2's first :data:`SMOLLM2_LAYERS` decoder layers, its embeddings, norm and head."""
    model = copy.copy(smollm2.model)  # a shallow copy: the frozen shared model is untouched
    model.config = copy.deepcopy(smollm2.model.config)
    model.config.num_hidden_layers = SMOLLM2_LAYERS
    model.model = copy.copy(smollm2.model.model)
    model.model.config = model.config
    model.model.layers = torch.nn.ModuleList(list(smollm2.model.model.layers)[:SMOLLM2_LAYERS])
    return LoadedModel(name=f"{smollm2.name}-first{SMOLLM2_LAYERS}", model=model,
                       tokenizer=smollm2.tokenizer, device=smollm2.device)


@pytest.mark.slow
def test_smollm2_graph_gives_pytorchs_tokens_for_every_kind_of_row(smollm2_head,
                                                                   tmp_path_factory):
    """SmolLM2's weights and shapes: base, stage-1 (LoRA-C), OPPU, PER-PCS and PerFit rows
    (each method's real shapes, random values) on real prompts, in one batch: the same
    greedy tokens as the PyTorch engine, logits within the tolerance."""
    from simulations.bench_serve import _prompts, _Users

    smollm2 = smollm2_head
    users = _Users(smollm2.model, seed=0)
    for i in range(3):
        users.sharer(f"sharer-{i}")
    kinds = ["base", "lora-c", "oppu", "perpcs", "perfit"]
    rows = [users.row(kind, users.payload(kind)) for kind in kinds]
    _, prompts = _prompts(smollm2.tokenizer, len(kinds), seed=0)
    path = exported_graph(smollm2, cache=tmp_path_factory.mktemp("onnx-smollm2"),
                          progress=lambda message: None)
    with BatchedEngine(smollm2.model, smollm2.tokenizer) as torch_engine:
        expected = torch_engine.generate(prompts, rows, max_new_tokens=12)
        expected_logits = torch_engine.last_logits(prompts, rows).numpy()
    with OnnxEngine(path, smollm2.tokenizer, threads=1) as engine:
        got = engine.generate(prompts, rows, max_new_tokens=12)
        logits = engine.last_logits(prompts, rows)
    assert np.abs(logits - expected_logits).max() < 1e-3  # SmolLM2's logits reach ~30
    assert got == expected
    assert len({tuple(t) for t in got}) > 1  # the rows are answered differently


def test_a_graph_with_missing_or_cut_weights_is_a_one_line_error(tiny, graph, tmp_path):
    """model.onnx.data missing or truncated (a damaged cache, a partial copy): a PflError
    that says what to delete, not an ONNX Runtime traceback."""
    import shutil

    from shared.errors import PflError

    path, _ = graph
    for damage in ("missing", "truncated"):
        folder = tmp_path / damage
        shutil.copytree(path.parent, folder)
        data = folder / "model.onnx.data"
        if damage == "missing":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        with pytest.raises(PflError, match="cannot be loaded"):
            OnnxEngine(folder / path.name, tiny.tokenizer, threads=1)
