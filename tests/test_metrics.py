"""LaMP metrics against hand-computed cases, invalid outputs included."""

import math

import pytest

from shared.metrics import (classification_metrics, evaluate, generation_metrics, label_index,
                            parse_rating, rating_metrics)
from shared.tasks import LAMP_3, LAMP_4, LAMP_2_MOVIE, news_category

LABELS = ["a", "b", "c"]


def test_label_index_exact_match_after_strip_only():
    assert label_index("  b \n", LABELS) == 1
    assert label_index("B", LABELS) == -1  # case matters, as in LaMP
    assert label_index("b.", LABELS) == -1
    assert label_index("", LABELS) == -1


def test_classification_accuracy_and_macro_f1_by_hand():
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "nonsense"]  # the invalid one counts as wrong, for no label
    m = classification_metrics(preds, golds, LABELS)
    assert m["accuracy"] == pytest.approx(2 / 4)
    # a: tp1 fp0 fn1 -> p1 r.5 f 2/3; b: tp1 fp1 fn0 -> p.5 r1 f 2/3; c: tp0 fn1 -> 0
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["valid"] == pytest.approx(3 / 4)  # "nonsense" is not a label


def test_invalid_prediction_costs_recall_only():
    golds = ["a", "b"]
    # "b" predicted for a would add a false positive to b; an invalid prediction must not
    with_invalid = classification_metrics(["zzz", "b"], golds, LABELS)
    with_wrong = classification_metrics(["b", "b"], golds, LABELS)
    # invalid: a r=0 -> f 0; b p=1 r=1 -> 1; c: 0  => 1/3
    assert with_invalid["f1"] == pytest.approx(1 / 3)
    # wrong label: b p=.5 r=1 -> 2/3  => 2/9
    assert with_wrong["f1"] == pytest.approx(2 / 9)
    assert with_invalid["accuracy"] == with_wrong["accuracy"] == 0.5


def test_labels_outside_the_gold_set_still_count_in_macro_average():
    m = classification_metrics(["a"], ["a"], LABELS)
    assert m["accuracy"] == 1.0
    assert m["f1"] == pytest.approx(1 / 3)  # b and c have no support: 0 each, as LaMP's sklearn


def test_gold_outside_label_list_is_an_error():
    with pytest.raises(ValueError, match="not in the task's label list"):
        classification_metrics(["a"], ["d"], LABELS)


@pytest.mark.parametrize("pred,gold,expected", [
    ("4", 5.0, 4.0), (" 2.5 ", 3.0, 2.5), ("five", 5.0, 1.0), ("five", 1.0, 5.0),
    ("", 2.0, 5.0), ("", 4.0, 1.0), ("", 3.0, 5.0), ("nan", 2.0, 5.0),
    # off the 1..5 scale: not a rating either
    ("1000", 4.0, 1.0), ("-3", 2.0, 5.0), ("6", 5.0, 1.0), ("1", 1.0, 1.0), ("5.0", 2.0, 5.0),
])
def test_parse_rating_falls_back_to_farther_extreme(pred, gold, expected):
    assert parse_rating(pred, gold) == expected


def test_rating_mae_rmse_by_hand():
    m = rating_metrics(["5", "x", "3"], ["4", "2", "3"])
    errors = [1.0, 3.0, 0.0]  # "x" with gold 2 -> 5 (farther), error 3
    assert m["mae"] == pytest.approx(sum(errors) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3))
    assert m["valid"] == pytest.approx(2 / 3)  # "x" does not parse
    assert rating_metrics(["inf", " 2 "], ["1", "2"])["valid"] == 0.5


def test_rouge_f_measures_by_hand():
    m = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    # unigram overlap 3: P=3/3, R=3/6 -> F=2/3; LCS=3, same
    assert m["rouge-1"] == pytest.approx(2 / 3)
    assert m["rouge-L"] == pytest.approx(2 / 3)


def test_rouge_averages_over_queries_and_uses_no_stemmer():
    m = generation_metrics(["cats running", "exact match"], ["cat runs", "exact match"])
    assert m["rouge-1"] == pytest.approx((0.0 + 1.0) / 2)  # no stemming: cats != cat


def test_rouge_l_differs_from_rouge_1_on_order():
    m = generation_metrics(["mat the on sat cat the"], ["the cat sat on the mat"])
    assert m["rouge-1"] == pytest.approx(1.0)
    assert m["rouge-L"] < 1.0


def test_evaluate_dispatches_by_task_kind():
    assert set(evaluate(LAMP_2_MOVIE, ["comedy"], ["comedy"])) == {"accuracy", "f1", "valid"}
    assert set(evaluate(LAMP_3, ["3"], ["3"])) == {"mae", "rmse", "valid"}
    assert set(evaluate(LAMP_4, ["a b"], ["a b"])) == {"rouge-1", "rouge-L"}
    assert evaluate(news_category(("x", "y")), ["y"], ["y"])["accuracy"] == 1.0
    with pytest.raises(ValueError):
        evaluate(LAMP_4, ["a"], ["a", "b"])


def test_an_honest_devices_wild_rating_answer_keeps_its_statistics():
    """A model that answers "1000" or "-7" (the tiny random model can) is wrong, not hostile:
    its error counts as the scale's worst (4), so the server's bounds still take the
    device's statistics."""
    from shared.metrics import check_stats, metric_stats
    from shared.tasks import SYNTHETIC

    stats = metric_stats(SYNTHETIC, ["1000", "-7", "3"], ["4", "2", "3"])
    assert stats["abs_error"] == 3.0 + 3.0 and stats["valid"] == 1.0
    assert check_stats(SYNTHETIC, stats) is None
