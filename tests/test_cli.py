"""The pfl command: end-to-end eval on the tiny model, data stats, one-line errors."""

import json
import subprocess
import sys

import pytest

from simulations.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prompt_baselines_end_to_end(capsys, tmp_path):
    out_file = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", "--task", "synthetic", "--model", "tiny", "--methods",
                         "nonpersonalized,random1,rag1,rag2,pag,pag+rag1", "--users", "3",
                         "--out", str(out_file), "--quiet")
    assert code == 0, err
    results = json.loads(out_file.read_text())
    assert results["task"] == "synthetic" and results["base_model"] == "tiny"
    assert results["users"] == 3
    assert list(results["methods"]) == ["nonpersonalized", "random1", "rag1", "rag2", "pag",
                                        "pag+rag1"]
    assert results["queries"] == 9  # 3 queries per user by default
    for r in results["methods"].values():
        assert set(r["metrics"]) == {"mae", "rmse", "valid"}
        assert 0 <= r["metrics"]["mae"] <= 4
        assert {"params_per_user", "bytes_per_user", "seconds_per_user"} <= set(r)
        # every query kept, with what the bootstrap needs
        assert [q["user"] for q in r["queries"]] == [u for u in results["targets"]
                                                     for _ in range(3)]
        assert all(q["stats"]["n"] == 1 and "prediction" in q for q in r["queries"])
        interval = r["intervals"]["mae"]
        assert interval["low"] <= r["metrics"]["mae"] <= interval["high"]
    assert "pag+rag1" in out and "mae" in out  # the table
    assert "pag vs nonpersonalized" in out  # the paired comparisons

    code, out, err = run(capsys, "compare", str(out_file), "rag1", "random1", "--metrics",
                         "mae,valid")
    assert code == 0, err
    assert "rag1 vs random1" in out and "valid" in out and "/9" in out
    code, _, err = run(capsys, "compare", str(out_file), "rag1", "oppu")
    assert code == 2 and "no per-query results for oppu" in err
    code, _, err = run(capsys, "compare", str(out_file), "rag1")
    assert code == 2 and "give two methods" in err

    # a run split over files (later methods, another recipe): claims and compare read both
    first, later = tmp_path / "first.json", tmp_path / "later.json"
    results["methods"] = {k: v for k, v in json.loads(out_file.read_text())["methods"].items()
                          if k in ("nonpersonalized", "rag1")}
    first.write_text(json.dumps(results))
    whole = json.loads(out_file.read_text())
    whole["methods"] = {"oppu": whole["methods"]["rag2"], "rag1": whole["methods"]["pag"]}
    later.write_text(json.dumps(whole))
    code, out, err = run(capsys, "claims", str(first))
    assert code == 0, err
    assert "oppu beats non-personalized" in out and "not measured" in out.split(
        "oppu beats non-personalized")[1].splitlines()[0]
    code, out, err = run(capsys, "claims", str(first), "--also", str(later))
    assert code == 0, err
    assert f"from {later}: oppu\n" in out  # rag1 is the first file's: kept, not replaced
    claim_row = out.split("oppu beats non-personalized")[1].splitlines()[0]
    assert "not measured" not in claim_row and "[" in claim_row  # with its interval
    code, out, err = run(capsys, "compare", str(first), "rag1", "rag1@l", "--also",
                         f"{later}=l")
    assert code == 0, err
    assert "rag1 vs rag1@l" in out
    whole["targets"] = whole["targets"][:-1] + ["someone-else"]
    later.write_text(json.dumps(whole))
    code, _, err = run(capsys, "claims", str(first), "--also", str(later))
    assert code == 2 and "other targets" in err


def test_eval_resume_keeps_finished_methods_and_refuses_other_settings(capsys, tmp_path):
    out_file = tmp_path / "r.json"
    base = ["eval", "--task", "synthetic", "--model", "tiny", "--users", "2", "--quiet",
            "--out", str(out_file)]
    code, _, err = run(capsys, *base, "--methods", "nonpersonalized,rag1")
    assert code == 0, err
    first = json.loads(out_file.read_text())
    # mark the kept results: a resumed run must keep them as they are, not recompute them
    first["methods"]["rag1"]["seconds_per_user"] = -1.0
    out_file.write_text(json.dumps(first))

    code, out, err = run(capsys, *base, "--methods", "rag1,nonpersonalized,rag2", "--resume")
    assert code == 0, err
    second = json.loads(out_file.read_text())
    assert list(second["methods"]) == ["rag1", "nonpersonalized", "rag2"]
    assert second["methods"]["rag1"]["seconds_per_user"] == -1.0
    assert second["methods"]["nonpersonalized"] == first["methods"]["nonpersonalized"]
    assert second["methods"]["rag2"]["seconds_per_user"] >= 0
    assert second["targets"] == first["targets"] and len(second["targets"]) == 2

    code, _, err = run(capsys, *base, "--methods", "rag1", "--seed", "7", "--resume")
    assert code == 2 and "cannot resume" in err and "seed" in err
    assert json.loads(out_file.read_text()) == second  # left untouched
    code, _, err = run(capsys, "eval", "--task", "synthetic", "--resume", "--quiet")
    assert code == 2 and "--resume needs --out" in err
    # a resumed run that asks for other methods adds them and loses none of the file's
    code, _, err = run(capsys, *base, "--methods", "random1", "--resume")
    assert code == 0, err
    third = json.loads(out_file.read_text())
    assert list(third["methods"]) == ["rag1", "nonpersonalized", "rag2", "random1"]
    assert all(third["methods"][m] == second["methods"][m] for m in second["methods"])


def test_data_stats_synthetic_json(capsys):
    code, out, _ = run(capsys, "data", "stats", "synthetic", "--num-users", "50", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["users"] == 50 and stats["queries"] == 100


def test_data_stats_huffpost_table(capsys, huffpost_dir):
    code, out, _ = run(capsys, "data", "stats", str(huffpost_dir))
    assert code == 0 and "news-headline" in out and "users" in out


@pytest.mark.parametrize("argv,message", [
    (["eval", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "--task", "synthetic", "--methods", "rag1,foo"], "unknown method 'foo'"),
    (["eval", "--task", "synthetic", "--methods", "oppu+lora-x"], "unknown method"),
    (["eval", "--task", "news-headline", "--data", "/no/such/dir"], "/no/such/dir"),
    (["eval", "--task", "synthetic", "--model", "gpt-17", "--users", "1"], "unknown model"),
    (["data", "stats", "/no/such/file.json"], "neither a task"),
    (["eval", "--task", "synthetic", "--model", "tiny", "--methods", "perpcs", "--users", "1",
      "--set", "perpcs.bogus=1"], "unknown setting perpcs.bogus"),
    (["eval", "--task", "synthetic", "--model", "tiny", "--methods", "oppu", "--users", "1",
      "--collective", "2", "--stage1-epochs", "0.2", "--set", "oppu.bogus=1"],
     "unknown setting oppu.bogus"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("pfl: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_lamp_file_is_one_line_error(capsys, tmp_path):
    bad = tmp_path / "dev_questions.json"
    bad.write_text('[{"id": "1", "input": "x", "profile": [}')
    code, _, err = run(capsys, "eval", "--task", "LaMP-4", "--data", str(bad))
    assert code == 2 and "dev_questions.json" in err and err.count("\n") == 1


def test_console_script_reports_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "eval", "--task", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("pfl: error: unknown task")
    assert "Traceback" not in proc.stderr


def test_the_demo_tables_count_nodes_as_the_in_process_grid_does():
    from simulations.cli import FIRST_NODE_ID
    from simulations.simulate import LocalGrid

    assert FIRST_NODE_ID == LocalGrid.FIRST_NODE_ID
