"""The federation's run configuration: one typed dataclass, the same defaults as pyproject."""

import tomllib
from pathlib import Path

import pytest

from shared.config import (DECLARED_SETTINGS, RunConfig, options_from_message,
                           options_to_message, settings_keys)
from shared.errors import PflError

ROOT = Path(__file__).resolve().parents[1]
SERVER_SET = {"method", "output-dir"}  # set by the server for a stage-1 phase, not by people


def test_pyproject_lists_exactly_the_dataclass_defaults():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = {key: getattr(RunConfig(), f.name) for key, f in RunConfig.keys().items()
                if key not in SERVER_SET}
    assert listed == {**defaults, **DECLARED_SETTINGS}  # TOML's dotted keys nest
    flat = {**defaults, **settings_keys(DECLARED_SETTINGS)}
    assert RunConfig.parse(flat) == RunConfig()  # declared settings start unset


def test_values_are_typed_and_checked_and_unknown_keys_refused():
    config = RunConfig.parse({"targets": "3", "fraction-train": "0.5", "keep-updates": "true",
                              "max-history": 20.0})
    assert (config.targets, config.fraction_train, config.keep_updates, config.max_history) \
        == (3, 0.5, True, 20)
    with pytest.raises(PflError, match="unknown run-config key 'target'"):
        RunConfig.parse({"target": 3})
    with pytest.raises(PflError, match="'targets': 'many' is not a int"):
        RunConfig.parse({"targets": "many"})
    with pytest.raises(PflError, match="'targets': 2.5 is not a int"):
        RunConfig.parse({"targets": 2.5})
    with pytest.raises(PflError, match="fraction-train must be in"):
        RunConfig.parse({"fraction-train": 0})
    with pytest.raises(PflError, match="selection must be"):
        RunConfig.parse({"selection": "random"})


def test_dotted_method_settings_replace_the_json_string():
    config = RunConfig.parse({"oppu.lr": 0.001, "perpcs.top_k": 1, "max-history": 8,
                              "personal-epochs": 3})
    assert config.method_settings() == {"oppu": {"lr": 0.001}, "perpcs": {"top_k": 1},
                                        "max_history": 8, "personal_epochs": 3.0}
    keys = settings_keys(config.method_settings())
    assert RunConfig.parse(keys).method_settings() == config.method_settings()
    assert RunConfig.parse(config.run_config()) == config
    with pytest.raises(PflError, match="unknown method option 'opu'"):
        settings_keys({"opu": {"lr": 1}})


def test_method_options_travel_as_flat_entries():
    options = {"max_history": 16, "stage1": {"lr": 1e-4}, "perpcs": {
        "target_modules": ["q_proj", "v_proj"], "top_k": 2}, "unset": None}
    entries = options_to_message(options)
    assert all(isinstance(v, (int, float, str, list)) for v in entries.values())
    assert entries["options.perpcs.top_k"] == 2
    back = options_from_message({**entries, "model": "tiny"})
    assert back == {k: v for k, v in options.items() if v is not None}


def test_pfl_config_show_names_every_value_and_where_it_came_from(tmp_path, capsys):
    from simulations import cli

    run_toml = tmp_path / "run.toml"
    run_toml.write_text('model = "smollm2-135m"\ntask = "news-category"\noppu.lr = 0.002\n')
    assert cli.main(["config", "show", "--run-config", str(run_toml), "--set", "targets=3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["targets"][1:] == ["3", "1", "--set"]
    assert rows["model"][1:] == ["'smollm2-135m'", "'tiny'", str(run_toml)]
    assert rows["sharers"][-1] == "default"
    assert rows["oppu.lr"][1:] == ["0.002", str(run_toml)]  # the run's own, over the recipe
    assert rows["perfit.lr"][2:4] == ["recipe", "tuned"]  # the shipped recipe's
    run_toml.write_text('modle = "tiny"\n')
    assert cli.main(["config", "show", "--run-config", str(run_toml)]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err
