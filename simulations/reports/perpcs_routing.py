"""Where do PER-PCS's gates send a target's weight? A check of the explanation in
personalization-synthetic.md ("the gates route by topic, not by taste").

For each of the 40 synthetic targets of the report's runs (same seed, sizes and recipe; the
cached stage 1 and sharers' pieces are reused), the target's PER-PCS recipe is assembled as
`pfl eval` does, and each sharer's share of the recipe's weight is set against two facts
about the pair, read from the personas behind the data:

- topic overlap: the share of the target's history items whose topic the sharer is also
  interested in;
- rule distance: the mean |sharer's rating - target's rating| over the target's history
  topics (0: the sharer rates the target's topics exactly as the target does).

Spearman correlations over all (target, sharer) pairs, and how often the sharer with the
most gate weight is the one with the smallest rule distance (chance: 1 in 10).

    python simulations/reports/perpcs_routing.py > simulations/reports/perpcs-routing.txt
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import numpy as np
    from scipy.stats import spearmanr

    # a script: the project is importable only after the sys.path line above
    from shared.data import load_dataset
    from shared.methods import parse_method
    from shared.methods.base import PromptAugmentation, Runtime
    from shared.models import load_model
    from simulations.evaluate import EvalConfig, assign_roles, run_options, use_stores
    from simulations.references import persona_of, topic_in

    config = EvalConfig(task="synthetic", users=40, sharers=10, collective=10, max_history=16,
                        recipe="paper", options={"stage1": {"lr": 1e-4},
                                                 "oppu": {"lr": 1e-3, "epochs": 2}})
    dataset = load_dataset("synthetic", None, queries_per_user=3, seed=0)
    roles = assign_roles(dataset, config.users, config.sharers, config.collective, 0)
    loaded = load_model(None, seed=0)
    runtime = Runtime(loaded=loaded, task=dataset.task, seed=0, progress=False,
                      options=run_options(config)[1], roles=roles)
    use_stores(runtime, None)
    core = parse_method("perpcs").make_core()
    core.prepare(runtime, dataset, PromptAugmentation())
    sharers = roles["sharers"]
    weight, overlap, distance, top_is_best, rows = [], [], [], 0, []
    for target in roles["targets"]:
        recipe = core.recipe(runtime, target, PromptAugmentation(), None)
        share = dict.fromkeys((s.id for s in sharers), 0.0)
        for items in recipe.entries.values():
            for piece_id, w in items:
                share[recipe.sources[piece_id]] += w
        total = sum(share.values()) or 1.0
        me = persona_of(dataset, target)
        topics = [topic_in(item["text"]) for item in target.history[-16:]]
        pair = []
        for sharer in sharers:
            other = persona_of(dataset, sharer)
            pair.append((share[sharer.id] / total,
                         sum(t in other.interests for t in topics) / len(topics),
                         float(np.mean([abs(other.rating(t) - me.rating(t)) for t in topics]))))
        for w, o, d in pair:
            weight.append(w)
            overlap.append(o)
            distance.append(d)
        top = max(range(len(pair)), key=lambda i: pair[i][0])
        best = min(range(len(pair)), key=lambda i: pair[i][2])
        top_is_best += pair[top][2] == pair[best][2]
        rows.append((target.id, pair[top][0], pair[top][1], pair[top][2], pair[best][2]))
    rho_o = spearmanr(weight, overlap)
    rho_d = spearmanr(weight, distance)
    print(f"{len(roles['targets'])} targets x {len(sharers)} sharers; PER-PCS (papers' gates, "
          "top-2) recipes assembled as pfl eval does")
    print(f"gate weight vs topic overlap:  Spearman rho {rho_o.statistic:+.3f} "
          f"(p {rho_o.pvalue:.2g})")
    print(f"gate weight vs rule distance:  Spearman rho {rho_d.statistic:+.3f} "
          f"(p {rho_d.pvalue:.2g})  (negative: more weight to sharers who rate alike)")
    print(f"the most-weighted sharer has the smallest rule distance for {top_is_best} of "
          f"{len(rows)} targets (chance about {len(rows) / len(sharers):.0f})")
    print(f"mean rule distance: most-weighted sharer {np.mean([r[3] for r in rows]):.3f}, "
          f"best sharer {np.mean([r[4] for r in rows]):.3f}, all sharers "
          f"{np.mean(distance):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
