"""The paper-claims report computes its ratios the right way round."""

import pytest

from simulations.claims import claims_table, paper_claims, score_ratio


def result(metric, scores, seconds=None, bytes_=None, params=None):
    methods = {}
    for name, value in scores.items():
        methods[name] = {"metrics": {metric: value},
                         "seconds_per_user": (seconds or {}).get(name, 1.0),
                         "bytes_per_user": (bytes_ or {}).get(name, 0),
                         "params_per_user": (params or {}).get(name, 0)}
    return {"task": "t", "base_model": "m", "users": 3, "methods": methods}


def test_score_ratio_inverts_lower_is_better_metrics():
    higher = result("rouge-1", {"perpcs": 0.3, "oppu": 0.4})
    assert score_ratio(higher, "perpcs", "oppu") == pytest.approx(0.75)
    lower = result("mae", {"perpcs": 0.5, "oppu": 1.0})  # half the error: twice as good
    assert score_ratio(lower, "perpcs", "oppu") == pytest.approx(2.0)
    assert score_ratio(lower, "perfit", "oppu") is None
    zero = result("accuracy", {"nonpersonalized": 0.0, "oppu": 0.05, "rag1": 0.0})
    assert score_ratio(zero, "oppu", "nonpersonalized") == float("inf")  # beats a score of 0
    assert score_ratio(zero, "rag1", "nonpersonalized") == 1.0
    rows = {r["claim"]: r for r in paper_claims(zero)}
    assert rows["oppu beats non-personalized"]["held"] is True


def test_claims_measure_compute_storage_and_parameters():
    results = result("accuracy", {"nonpersonalized": 0.2, "oppu": 0.5, "perpcs": 0.5,
                                  "peft-retrieval": 0.4, "perfit": 0.6},
                     seconds={"oppu": 70.0, "perpcs": 5.0, "perfit": 35.0},
                     bytes_={"oppu": 1_843_200, "perpcs": 1_500},
                     params={"oppu": 460_800, "perfit": 4_620})
    rows = {r["claim"]: r for r in paper_claims(results)}
    assert rows["OPPU s/user / PER-PCS s/user ~ 7x"]["measured"] == pytest.approx(14.0)
    assert rows["OPPU s/user / PER-PCS s/user ~ 7x"]["held"] is True
    assert rows["OPPU bytes/user / PER-PCS bytes/user ~ 38x"]["measured"] == pytest.approx(1228.8)
    assert rows["PerFit parameters vs OPPU: ~92% fewer"]["measured"] == pytest.approx(
        1 - 4_620 / 460_800)
    assert rows["PerFit s/user < OPPU s/user"]["held"] is True
    assert rows["PER-PCS beats PEFT retrieval"]["held"] is True
    assert "did not hold" not in claims_table(results).split("PER-PCS score")[1].splitlines()[0]


def test_augmented_variants_get_their_own_claims_only_when_run():
    plain = result("rouge-1", {"oppu": 0.4, "perpcs": 0.4})
    assert not [r for r in paper_claims(plain) if "+" in r["claim"]]
    both = result("rouge-1", {"oppu": 0.4, "perpcs": 0.4, "oppu+rag1": 0.5, "perpcs+rag1": 0.45,
                              "oppu+pag": 0.38})
    rows = {r["claim"]: r for r in paper_claims(both)}
    assert rows["PER-PCS+rag1 score / OPPU+rag1 score ~ 0.99"]["measured"] == pytest.approx(0.9)
    assert rows["PER-PCS+rag1 score / OPPU+rag1 score ~ 0.99"]["held"] is False
    assert rows["OPPU+rag1 beats OPPU"]["held"] is True
    assert rows["OPPU+pag beats OPPU"]["held"] is False
    assert "PER-PCS+pag score / OPPU+pag score ~ 0.99" not in rows  # perpcs+pag was not run
    assert "PerFit+pag beats PerFit" not in rows and not [r for r in rows if "LoRA-P" in r]
    more = result("rouge-1", {"oppu": 0.4, "perfit": 0.4, "perfit+pag": 0.3, "lora-p": 0.5})
    rows = {r["claim"]: r for r in paper_claims(more)}
    assert rows["PerFit+pag beats PerFit"]["held"] is False
    assert rows["OPPU beats LoRA-P (personal LoRA without stage 1)"]["held"] is False
    assert "OPPU+pag beats OPPU" not in rows
