"""The device's consent policy: documented defaults, opt-in, piece filtering, bad files."""

from __future__ import annotations

import tomllib
from importlib import resources

import pytest
import torch

from edge_client.consent import KINDS, ConsentDenied, ConsentPolicy
from shared.errors import PflError
from shared.methods.perpcs.pieces import Piece

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")


def pieces(layers: int = 4, modules=MODULES, sharer: str = "s1") -> list[Piece]:
    gen = torch.Generator().manual_seed(0)
    return [Piece(sharer, layer, module, torch.randn(2, 6, generator=gen),
                  torch.randn(6, 2, generator=gen), 2.0)
            for layer in range(layers) for module in modules]


def write(tmp_path, text: str):
    path = tmp_path / "consent.toml"
    path.write_text(text)
    return path


def test_defaults_file_is_valid_toml_setting_every_key():
    text = resources.files("edge_client").joinpath("consent_default.toml").read_text()
    data = tomllib.loads(text)
    assert data["upload"]["perpcs_pieces"] is False
    policy = ConsentPolicy.load(None)
    assert policy.source == "defaults"
    assert set(policy.as_dict()) == {"upload", "sharing", "embeddings", "metrics", "inference"}
    assert data["inference"]["remote"] is False and policy.allows("inference_remote") is None


def test_defaults_deny_pieces_and_embeddings_allow_collective_and_metrics():
    policy = ConsentPolicy.load()
    assert policy.allows("perpcs_pieces") is None
    assert policy.allows("perpcs_pieces", layer=0, module="q_proj") is None
    assert policy.allows("embeddings") is None
    assert policy.allows("oppu_personal_lora") is None and policy.allows("perfit_stage2") is None
    assert policy.allows("stage1_lora") == "upload.stage1_lora"
    assert policy.allows("perfit_stage1") == "upload.perfit_stage1"
    assert policy.allows("metrics") == "metrics.may_report"
    assert policy.allows("cluster_index") == "upload.cluster_index"
    assert policy.filter_pieces(pieces(), seed=0) == []
    with pytest.raises(ConsentDenied, match=r"\[upload\] perpcs_pieces = false") as err:
        policy.require("perpcs_pieces")
    assert err.value.rule == "upload.perpcs_pieces" and isinstance(err.value, PflError)
    with pytest.raises(ConsentDenied, match="may_leave_device"):
        policy.require("embeddings")
    assert policy.require("stage1_lora") == "upload.stage1_lora"
    with pytest.raises(ValueError, match="unknown upload kind"):
        policy.allows("raw_text")
    assert all(kind in policy.describe() for kind in KINDS)


def test_opt_in_allows_and_names_the_rule(tmp_path):
    path = write(tmp_path, """
[upload]
perpcs_pieces = true
stage1_lora = false
[sharing]
layers = [0, 2]
modules = ["q_proj", "v_proj"]
[embeddings]
may_leave_device = true
""")
    policy = ConsentPolicy.load(path)
    assert policy.source == str(path)
    assert policy.allows("perpcs_pieces") == "upload.perpcs_pieces"
    assert policy.allows("perpcs_pieces", layer=2, module="v_proj") == "upload.perpcs_pieces"
    assert policy.allows("perpcs_pieces", layer=1, module="v_proj") is None
    assert policy.allows("perpcs_pieces", layer=0, module="k_proj") is None
    assert policy.allows("embeddings") == "embeddings.may_leave_device"
    assert policy.allows("stage1_lora") is None
    assert policy.allows("metrics") == "metrics.may_report"  # untouched keys keep defaults
    assert policy.ratio == 0.2
    with pytest.raises(ConsentDenied, match=r"layer 3 is outside \[sharing\] layers"):
        policy.require("perpcs_pieces", layer=3, module="q_proj")
    assert policy.fingerprint != ConsentPolicy.load().fingerprint


def test_filter_pieces_respects_layers_modules_and_ratio(tmp_path):
    path = write(tmp_path, """
[upload]
perpcs_pieces = true
[sharing]
layers = [1, 2, 3]
modules = ["q_proj", "k_proj", "o_proj", "up_proj"]
ratio = 0.5
""")
    policy = ConsentPolicy.load(path)
    all_pieces = pieces()  # 4 layers x 5 modules; eligible: 3 layers x 4 modules = 12
    shared = policy.filter_pieces(all_pieces, seed=0)
    assert len(shared) == 6
    assert all(p.layer in (1, 2, 3) and p.module != "v_proj" for p in shared)
    again = policy.filter_pieces(list(reversed(all_pieces)), seed=0)
    assert [p.piece_id for p in again] == [p.piece_id for p in shared]  # deterministic
    others = {tuple(p.piece_id for p in policy.filter_pieces(all_pieces, seed=s))
              for s in range(1, 6)}
    assert len(others | {tuple(p.piece_id for p in shared)}) > 1  # the seed matters

    full = ConsentPolicy.load(write(tmp_path, """
[upload]
perpcs_pieces = true
[sharing]
layers = "all"
modules = "all"
ratio = 1.0
"""))
    assert len(full.filter_pieces(all_pieces, seed=0)) == len(all_pieces)


@pytest.mark.parametrize("text, match", [
    ("[upload]\nperpcs_pieces = tru\n", "malformed TOML"),
    ("[upload]\nperpcs_piece = true\n", r"unknown key \[upload\] perpcs_piece"),
    ("[uploads]\nstage1_lora = true\n", "unknown key 'uploads'"),
    ("[upload]\nperpcs_pieces = \"yes\"\n", r"\[upload\] perpcs_pieces must be true or false"),
    ("[sharing]\nratio = 0\n", r"\[sharing\] ratio must be a number in \(0, 1\]"),
    ("[sharing]\nratio = 1.5\n", "ratio"),
    ("[sharing]\nlayers = [0, -1]\n", r"\[sharing\] layers must be"),
    ("[sharing]\nlayers = \"some\"\n", "layers"),
    ("[sharing]\nmodules = [\"qproj\"]\n", "unknown module 'qproj'"),
    ("[embeddings]\nmay_leave_device = 1\n", "may_leave_device must be true or false"),
    ("version = 2\n", "version must be 1"),
    ("upload = true\n", "must be a table"),
])
def test_bad_files_raise_pfl_error_naming_key_and_file(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(PflError, match=match) as err:
        ConsentPolicy.load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(PflError, match="no consent policy file"):
        ConsentPolicy.load(tmp_path / "nope.toml")
