"""Scores as statistics: bootstrap intervals over users, paired comparisons, claims with CIs."""

import json
import random

import pytest

from shared.metrics import add_stats, evaluate, metric_stats, metrics_from_stats
from shared.report import comparisons_table, results_table
from shared.statistics import (metric_interval, metric_task, paired_comparison,
                                    paired_ratio)
from shared.tasks import LAMP_3, news_category
from simulations.claims import paper_claims

CATEGORY = news_category(("arts", "food", "sports"))


def queries(task, users: int, per_user: int, answer) -> list[dict]:
    """Per-query records as pfl eval writes them; ``answer(user, query, gold)`` predicts."""
    rng = random.Random(0)
    out = []
    for u in range(users):
        for q in range(per_user):
            gold = (rng.choice(task.labels) if task.kind == "classification"
                    else str(rng.randint(1, 5)))
            prediction = answer(u, q, gold)
            out.append({"user": f"u{u}", "query": f"u{u}-q{q}", "prediction": prediction,
                        "gold": gold, "stats": metric_stats(task, [prediction], [gold])})
    return out


def results_of(task, methods: dict) -> dict:
    entries = {}
    for name, qs in methods.items():
        metrics = evaluate(task, [q["prediction"] for q in qs], [q["gold"] for q in qs])
        entries[name] = {"metrics": metrics, "queries": qs, "seconds_per_user": 1.0,
                         "bytes_per_user": 0, "params_per_user": 0}
    return {"task": task.name, "base_model": "m", "users": 0, "seed": 0,
            "metric_task": {"kind": task.kind, "labels": list(task.labels)},
            "methods": entries}


def test_summed_per_query_statistics_give_exactly_the_metrics():
    """A bootstrap resample is scored from summed per-query statistics: they must give the
    very metrics evaluate() gives, macro F1, RMSE and the valid rate included."""
    for task, answer in ((CATEGORY, lambda u, q, g: g if (u + q) % 3 else "nonsense"),
                         (LAMP_3, lambda u, q, g: "x" if q == 0 else str(int(g) % 5 + 1))):
        qs = queries(task, 7, 3, answer)
        total = {}
        for q in qs:
            add_stats(total, q["stats"])
        expected = evaluate(task, [q["prediction"] for q in qs], [q["gold"] for q in qs])
        assert metrics_from_stats(task, total) == pytest.approx(expected)
        assert 0 < expected["valid"] < 1


def test_interval_is_over_users_seeded_and_contains_the_value():
    # half the users always right, half always wrong: accuracy 0.5, wide interval
    qs = queries(CATEGORY, 20, 3, lambda u, q, g: g if u % 2 else "arts" if g != "arts" else "food")
    a = metric_interval(CATEGORY, qs, "accuracy", seed=1)
    assert a["value"] == pytest.approx(0.5)
    assert a["low"] < 0.5 < a["high"] and a["high"] - a["low"] > 0.2
    assert metric_interval(CATEGORY, qs, "accuracy", seed=1) == a  # seeded
    # the same 60 queries spread so that every user has the same score: no spread left
    even = queries(CATEGORY, 20, 2, lambda u, q, g: g if q == 0 else "nonsense")
    b = metric_interval(CATEGORY, even, "accuracy")
    assert b["low"] == pytest.approx(0.5) and b["high"] == pytest.approx(0.5)
    alone = metric_interval(CATEGORY, qs[:3], "accuracy")
    assert alone["low"] is None and alone["high"] is None  # one user: no interval


def test_paired_comparison_detects_a_consistent_gain_and_not_noise():
    base = queries(LAMP_3, 30, 3, lambda u, q, g: "3")
    # better by exactly one rating point wherever the base is off
    better = [dict(q) for q in base]
    for q in better:
        gold, pred = int(q["gold"]), 3
        pred += (gold > 3) - (gold < 3)
        q["prediction"] = str(pred)
        q["stats"] = metric_stats(LAMP_3, [q["prediction"]], [q["gold"]])
    c = paired_comparison(LAMP_3, better, base, "mae", a="better", b="base")
    assert c.difference > 0 and c.low > 0 and c.verdict == "better"  # less error is better
    assert c.losses == 0 and c.wins + c.ties == 30
    assert c.identical == sum(q["gold"] == "3" for q in base) and c.queries == 90
    reverse = paired_comparison(LAMP_3, base, better, "mae")
    assert reverse.verdict == "worse" and reverse.difference == pytest.approx(-c.difference)
    same = paired_comparison(LAMP_3, base, base, "mae")
    assert (same.difference, same.low, same.high) == (0, 0, 0)
    assert same.identical == 90 and same.ties == 30
    assert same.verdict == "within noise"
    with pytest.raises(ValueError, match="same queries"):
        paired_comparison(LAMP_3, base, better[:-1], "mae")
    ratio = paired_ratio(LAMP_3, better, base, "mae")
    assert ratio["value"] > 1 and ratio["low"] > 1


def test_claims_hold_only_when_the_interval_supports_them():
    right = lambda u, q, g: g  # noqa: E731
    wrong = lambda u, q, g: "arts" if g != "arts" else "food"  # noqa: E731
    coin = lambda u, q, g: g if (u * 7 + q) % 2 else wrong(u, q, g)  # noqa: E731
    results = results_of(CATEGORY, {
        "nonpersonalized": queries(CATEGORY, 30, 3, wrong),
        "oppu": queries(CATEGORY, 30, 3, right),
        # PER-PCS right about half the time: a ratio to OPPU's far below 0.95
        "perpcs": queries(CATEGORY, 30, 3, coin),
        # PerFit: wrong on one query of 90: a ratio just under 1, within noise of it
        "perfit": queries(CATEGORY, 30, 3, lambda u, q, g: wrong(u, q, g) if u == q == 0 else g),
    })
    rows = {r["claim"]: r for r in paper_claims(results)}
    assert rows["oppu beats non-personalized"]["verdict"] == "held"
    assert rows["oppu beats non-personalized"]["low"] > 0
    assert rows["PER-PCS score / OPPU score ~ 0.99"]["verdict"] == "did not hold"
    perfit = rows["PerFit score / OPPU score >= 1"]
    assert perfit["measured"] < 1 and perfit["high"] >= 1 and perfit["verdict"] == "within noise"
    assert perfit["held"] is None
    # without per-query data the verdict says it is a point estimate
    for entry in results["methods"].values():
        del entry["queries"]
    rows = {r["claim"]: r for r in paper_claims(results)}
    assert rows["PerFit score / OPPU score >= 1"]["verdict"] == "did not hold (point estimate)"


def test_tables_show_intervals_and_comparisons():
    results = results_of(CATEGORY, {
        "nonpersonalized": queries(CATEGORY, 10, 3, lambda u, q, g: "nonsense"),
        "oppu": queries(CATEGORY, 10, 3, lambda u, q, g: g if u % 2 else "nonsense")})
    for name, entry in results["methods"].items():
        entry["intervals"] = {m: metric_interval(metric_task(results), entry["queries"], m)
                              for m in entry["metrics"]}
    table = results_table(results)
    oppu_line = next(line for line in table.splitlines() if line.startswith("oppu"))
    assert "0.5000 [" in oppu_line  # accuracy with its interval
    text = comparisons_table(json.loads(json.dumps(results)), [("oppu", "nonpersonalized")],
                             ["accuracy", "valid"])
    line = next(line for line in text.splitlines() if "accuracy" in line)
    assert "+0.5000 [" in line and "5/5/0" in line and "15/30" in line and "better" in line


def test_synthetic_reference_rows_bound_what_a_model_can_reach(capsys, tmp_path):
    """The persona-rule oracle sits at the noise floor; the population mean knows every
    topic's average and nothing of the user; neither takes a prompt augmentation."""
    from simulations.cli import main

    out = tmp_path / "r.json"
    code = main(["eval", "--task", "synthetic", "--model", "tiny", "--methods",
                 "oracle,population-mean", "--users", "30", "--collective", "20",
                 "--sharers", "0", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    methods = json.loads(out.read_text())["methods"]
    oracle, mean = methods["oracle"], methods["population-mean"]
    # 90 queries; a rating is one step off the rule with probability 0.1
    assert oracle["metrics"]["mae"] <= 0.25 and oracle["metrics"]["valid"] == 1.0
    assert all(abs(float(q["prediction"]) - float(q["gold"])) in (0.0, 1.0)
               for q in oracle["queries"])
    assert mean["metrics"]["mae"] > oracle["metrics"]["mae"] + 0.5
    assert oracle["params_per_user"] == 0
    code = main(["eval", "--task", "synthetic", "--model", "tiny", "--methods", "oracle+rag1",
                 "--users", "2", "--quiet"])
    assert code == 2 and "no +rag/+pag" in capsys.readouterr().err


def test_best_sharer_picks_the_sharer_whose_rule_fits_the_history():
    """The best-sharer reference follows the sharer whose persona rule fits the target's
    history best: a target that is itself among the sharers gets its own rule (the oracle's
    answers); without it, another sharer's rule, which misses some of the target's ratings."""
    from shared.data import load_dataset
    from shared.methods.base import PromptAugmentation, Runtime, core_class
    from simulations import references  # noqa: F401  (registers the reference rows)

    dataset = load_dataset("synthetic", None, num_users=12, seed=0, queries_per_user=3)
    target, others = dataset.user(11), [dataset.user(i) for i in range(10)]

    def answers(name, sharers):
        core = core_class(name)()
        runtime = Runtime(loaded=None, task=dataset.task, seed=0, progress=False,
                          roles={"sharers": sharers})
        core.prepare(runtime, dataset, PromptAugmentation())
        return core.personalize(runtime, target, PromptAugmentation(), None).payload

    oracle = answers("oracle", [])
    assert answers("best-sharer", others[:4] + [target] + others[4:]) == oracle
    assert answers("best-sharer", others) != oracle
    with pytest.raises(Exception, match="needs sharers"):
        answers("best-sharer", [])


def test_majority_rows_predict_the_users_and_the_populations_most_frequent_label():
    """user-majority answers each of a target's queries with the label it used most (ties: the
    most recent); majority answers everyone with the collective users' most frequent label.
    Neither exists where history items carry no label (LaMP-1) or with a prompt augmentation."""
    from shared.methods.base import PromptAugmentation, Runtime, core_class
    from shared.tasks import LAMP_1
    from shared.types import HistoryItem, Query, User
    from simulations import references  # noqa: F401  (registers the reference rows)

    def user(name, labels, task=CATEGORY, field="category"):
        history = tuple(HistoryItem(f"{name}-{i}", {"text": "t", field: label})
                        for i, label in enumerate(labels))
        return User(name, history, (Query(f"{name}-q0", "q", "arts"), Query(f"{name}-q1", "q")))

    def answers(name, target, collective, task=CATEGORY, augmentation=PromptAugmentation()):
        core = core_class(name)()
        runtime = Runtime(loaded=None, task=task, seed=0, progress=False,
                          roles={"collective": collective})
        core.prepare(runtime, None, augmentation)
        return core.personalize(runtime, target, augmentation, None).payload

    crowd = [user("c1", ["food", "food", "arts"]), user("c2", ["sports", "food"])]
    sporty = user("t1", ["sports", "arts", "sports", "food"])
    tied = user("t2", ["food", "arts", "arts", "food", "sports"])  # food/arts tie: food is later
    assert answers("user-majority", sporty, crowd) == ["sports", "sports"]
    assert answers("user-majority", tied, crowd) == ["food", "food"]
    assert answers("majority", sporty, crowd) == ["food", "food"]
    assert answers("majority", tied, crowd[1:]) == ["food", "food"]  # sports/food tie: food later
    with pytest.raises(Exception, match="needs collective users"):
        answers("majority", sporty, [])
    with pytest.raises(Exception, match="no \\+rag/\\+pag"):
        answers("user-majority", sporty, crowd, augmentation=PromptAugmentation(retrieval="bm25"))
    paper = user("p", ["A Title", "Another"], task=LAMP_1, field="title")
    with pytest.raises(Exception, match="do not carry its labels"):
        answers("user-majority", paper, crowd, task=LAMP_1)
