"""Training recipes: files, precedence, pfl eval --recipe, and pfl tune on validation users."""

import json

import pytest

from shared.data import load_dataset
from shared.errors import PflError
from shared.recipes import FORMAT, merge_options, resolve_recipe
from simulations.cli import main
from simulations.evaluate import assign_roles


def write_recipe(path, options, model="tiny", task="synthetic"):
    path.write_text(json.dumps({"format": FORMAT, "model": model, "task": task,
                                "options": options}))
    return path


def test_resolve_paper_tuned_and_files(tmp_path):
    assert resolve_recipe("paper", "smollm2-135m", "synthetic") == ("paper", {})
    # no tuned recipe ships for the tiny model: the papers' recipe, said by name
    assert resolve_recipe("tuned", "tiny", "synthetic") == ("paper", {})
    good = write_recipe(tmp_path / "r.json", {"oppu": {"lr": 1e-3}, "stage1_epochs": 1})
    assert resolve_recipe(str(good), "tiny", "synthetic") == (
        str(good), {"oppu": {"lr": 1e-3}, "stage1_epochs": 1})
    with pytest.raises(PflError, match="tuned for model tiny on synthetic, not tiny on "
                                       "news-category"):
        resolve_recipe(str(good), "tiny", "news-category")
    bad = write_recipe(tmp_path / "bad.json", {"opu": {"lr": 1e-3}})
    with pytest.raises(PflError, match="unknown settings section 'opu' \(did you mean 'oppu'"):
        resolve_recipe(str(bad), "tiny", "synthetic")
    nested = write_recipe(tmp_path / "nested.json", {"oppu": {"lr": {"x": 1}}})
    with pytest.raises(PflError, match="plain values"):
        resolve_recipe(str(nested), "tiny", "synthetic")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(PflError, match="not a recipe file"):
        resolve_recipe(str(tmp_path / "other.json"), "tiny", "synthetic")
    with pytest.raises(PflError, match="no recipe file"):
        resolve_recipe(str(tmp_path / "missing.json"), "tiny", "synthetic")


def test_command_line_settings_override_the_recipe_field_by_field():
    recipe = {"oppu": {"lr": 1e-3, "epochs": 4}, "perfit": {"lr": 1e-2}, "stage1_epochs": 2}
    merged = merge_options(recipe, {"oppu": {"lr": 5e-3}, "stage1_epochs": 1})
    assert merged == {"oppu": {"lr": 5e-3, "epochs": 4}, "perfit": {"lr": 1e-2},
                      "stage1_epochs": 1}
    assert recipe["oppu"] == {"lr": 1e-3, "epochs": 4}  # not modified


def _eval(capsys, tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    argv = ["eval", "--task", "synthetic", "--model", "tiny", "--methods", "perfit",
            "--users", "2", "--queries-per-user", "2", "--collective", "2", "--sharers", "0",
            "--max-history", "6", "--stage1-epochs", "1", "--quiet", "--out", str(out), *extra]
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_pfl_eval_trains_with_the_recipe_and_set_overrides_it(capsys, tmp_path):
    # a large PerFit lr visibly changes the tiny model's answers; the papers' 1e-4 does not
    recipe = write_recipe(tmp_path / "r.json", {"perfit": {"lr": 0.05, "epochs": 2}})
    paper = _eval(capsys, tmp_path, "paper", "--recipe", "paper")
    tuned = _eval(capsys, tmp_path, "tuned", "--recipe", str(recipe))
    back = _eval(capsys, tmp_path, "back", "--recipe", str(recipe), "--set", "perfit.lr=0.0001",
                 "--set", "perfit.epochs=4")
    assert paper["recipe"]["name"] == "paper"
    assert tuned["recipe"] == {"name": str(recipe), "options": {
        "perfit": {"lr": 0.05, "epochs": 2}, "max_history": 6, "stage1_epochs": 1.0,
        "stage1": {"epochs": 1.0}}}

    def predictions(results):
        return [q["prediction"] for q in results["methods"]["perfit"]["queries"]]
    assert predictions(tuned) != predictions(paper)
    assert predictions(back) == predictions(paper)  # --set restored the papers' values
    # a resumed run with another recipe is another setting
    code = main(["eval", "--task", "synthetic", "--model", "tiny", "--methods", "perfit",
                 "--users", "2", "--queries-per-user", "2", "--collective", "2", "--sharers",
                 "0", "--max-history", "6", "--stage1-epochs", "1", "--quiet", "--out",
                 str(tmp_path / "paper.json"), "--resume", "--recipe", str(recipe)])
    assert code == 2 and "options" in capsys.readouterr().err


def test_pfl_tune_scores_validation_users_only_and_resumes(capsys, tmp_path):
    out = tmp_path / "recipe.json"
    argv = ["tune", "--task", "synthetic", "--model", "tiny", "--targets", "3", "--sharers",
            "2", "--collective", "3", "--validation-users", "3", "--max-history", "6",
            "--stages", "stage1", "--grid", "stage1.lr=1e-4,5e-2", "--grid",
            "stage1.epochs=1", "--quiet", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    recipe = json.loads(out.read_text())
    roles = assign_roles(load_dataset("synthetic", None, queries_per_user=3), 3, 2, 3, seed=0)
    used = {u.id for role in ("targets", "sharers", "collective") for u in roles[role]}
    assert len(recipe["search"]["validation"]) == 3
    assert not used & set(recipe["search"]["validation"])
    assert [t["setting"] for t in recipe["trials"]] == [{"lr": 1e-4, "epochs": 1},
                                                        {"lr": 5e-2, "epochs": 1}]
    scores = [t["metrics"]["mae"] for t in recipe["trials"]]
    best = recipe["trials"][scores.index(min(scores))]["setting"]  # MAE: lower is better
    assert recipe["options"] == {"stage1": best}
    assert recipe["command"].startswith("pfl tune --task synthetic")
    assert (tmp_path / "recipe.md").read_text().count("stage1") >= 2
    # the recipe is usable as it is
    assert resolve_recipe(str(out), "tiny", "synthetic")[1] == {"stage1": best}
    # resume: finished trials are kept as they are, not run again
    recipe["trials"][0]["wall_seconds"] = -1.0
    out.write_text(json.dumps(recipe))
    assert main(argv + ["--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["trials"][0]["wall_seconds"] == -1.0 and len(again["trials"]) == 2
    code = main([*argv[:-2], "--out", str(out), "--resume", "--seed", "3"])
    assert code == 2 and "cannot resume" in capsys.readouterr().err
    # a finished recipe is extended by a later stage: its trials kept, the new stage's run on
    # top of its choice
    stages = argv.index("--stages") + 1
    extended = [*argv[:stages], "stage1,oppu", *argv[stages + 1:-2], "--grid",
                "oppu.lr=1e-3", "--grid", "oppu.epochs=1", "--out", str(out), "--resume"]
    assert main(extended) == 0, capsys.readouterr().err
    grown = json.loads(out.read_text())
    assert grown["trials"][0]["wall_seconds"] == -1.0
    assert [t["stage"] for t in grown["trials"]] == ["stage1", "stage1", "oppu"]
    assert grown["trials"][2]["options"]["stage1"] == best
    assert grown["options"] == {"stage1": best, "oppu": {"lr": 1e-3, "epochs": 1}}
    # but not with another grid for a stage it already tuned
    regridded = [a if a != "stage1.lr=1e-4,5e-2" else "stage1.lr=1e-4" for a in extended]
    assert main(regridded) == 2 and "cannot resume" in capsys.readouterr().err
    # a widened axis runs only its new value; the choice is made again over all the trials
    widened = [a if a != "stage1.lr=1e-4,5e-2" else "stage1.lr=1e-4,5e-2,1e-3"
               for a in extended]
    assert main(widened) == 0, capsys.readouterr().err
    wide = json.loads(out.read_text())
    assert [t["setting"]["lr"] for t in wide["trials"] if t["stage"] == "stage1"] == [
        1e-4, 5e-2, 1e-3]
    assert wide["trials"][0]["wall_seconds"] == -1.0 and wide["trials"][2]["wall_seconds"] > 0
    stage1 = [t for t in wide["trials"] if t["stage"] == "stage1"]
    maes = [t["metrics"]["mae"] for t in stage1]
    chosen = stage1[maes.index(min(maes))]["setting"]
    assert wide["options"]["stage1"] == chosen
    assert [t["options"]["stage1"] for t in wide["trials"] if t["stage"] == "oppu"] == [chosen]
    # another axis is another search
    other_axis = [a if a != "stage1.epochs=1" else "stage1.batch_size=2" for a in widened]
    assert main(other_axis) == 2 and "cannot resume" in capsys.readouterr().err
    # an axis no section has is refused before anything runs, with the closest field
    typo = [a if a != "stage1.epochs=1" else "stage1.epoch=2" for a in widened]
    assert main(typo) == 2 and "did you mean stage1.epochs" in capsys.readouterr().err


def test_epoch_flags_win_over_the_recipes_epochs_and_set_wins_over_both():
    from shared.recipes import over_recipe

    recipe = {"oppu": {"lr": 1e-3, "epochs": 2}, "stage1": {"lr": 1e-4, "epochs": 3}}
    assert over_recipe(recipe, {"personal_epochs": 4, "stage1_epochs": 1}) == {
        "oppu": {"lr": 1e-3, "epochs": 4}, "stage1": {"lr": 1e-4, "epochs": 1},
        "personal_epochs": 4, "stage1_epochs": 1}
    # an explicit --set oppu.epochs is more specific than --personal-epochs
    assert over_recipe(recipe, {"personal_epochs": 4, "oppu": {"epochs": 6}})["oppu"] == {
        "lr": 1e-3, "epochs": 6}
    assert over_recipe(recipe, {}) == recipe


def test_pfl_tune_can_score_the_sharers_too_but_never_for_perpcs(capsys, tmp_path):
    out = tmp_path / "recipe.json"
    argv = ["tune", "--task", "synthetic", "--model", "tiny", "--targets", "3", "--sharers",
            "2", "--collective", "3", "--validation-users", "1", "--max-history", "6",
            "--grid", "oppu.lr=1e-4,1e-3", "--grid", "oppu.epochs=1", "--quiet",
            "--validate-on-sharers", "--out", str(out)]
    # two personal trials on one stage 1: the second reuses the first's (and its state)
    assert main(argv + ["--stages", "oppu"]) == 0, capsys.readouterr().err
    recipe = json.loads(out.read_text())
    assert [t["setting"]["lr"] for t in recipe["trials"]] == [1e-4, 1e-3]
    search = recipe["search"]
    roles = assign_roles(load_dataset("synthetic", None, queries_per_user=3), 3, 2, 3, seed=0,
                         validation=1)
    assert search["validation"] == [u.id for u in roles["sharers"] + roles["validation"]]
    assert not {u.id for u in roles["targets"]} & set(search["validation"])
    assert "its 2 sharers are among them" in (tmp_path / "recipe.md").read_text()
    assert main(argv + ["--stages", "perpcs"]) == 2
    assert "cannot tune perpcs" in capsys.readouterr().err
