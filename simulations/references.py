"""Reference rows: what a predictor that runs no model scores on the same queries.

On the synthetic persona task, the best any model could do, and the best a model that knows
the population but not the user could do:

- ``oracle``: each target's noiseless persona rule (:meth:`shared.data.synthetic.Persona.
  rating` of the query's topic). Its error is the noise floor: a rating in the data moves one
  step from the rule with probability 0.1, which no model can predict.
- ``population-mean``: the mean rating of the query's topic over the collective users'
  histories. It knows the task and the population perfectly and nothing of the user, so a
  personalized method has to beat it to show that it learnt the user.
- ``best-sharer``: the noiseless persona rule of the one PER-PCS sharer whose rule fits the
  target's history best (lowest mean error over its history items; ties: the first sharer).
  It is what PER-PCS could reach if its assembly found that sharer from the target's history
  and the sharer's pieces had learnt its rule exactly: the ceiling of reusing one sharer.

These read the persona behind the synthetic data, so they exist for that task only.

On a classification task whose history items carry their label (news-category, LaMP-2,
LaMP-2N), the two trivial predictors a personalized model has to beat:

- ``majority``: the most frequent label over the collective users' histories, for every
  query (knows the population's label mix, nothing of the user or the query).
- ``user-majority``: the target's own most frequent label in its history, for each of its
  queries (ties: the label used most recently). It knows the user and not the query: an
  author who always writes for one section is predicted without reading the article.

And for PER-PCS' pool, on any task: ``perpcs-oracle``, the best single sharer for each target
chosen with the target's query answers (a cheating ceiling, :class:`PoolOracle`).

None but ``perpcs-oracle`` runs the model; all are rows of ``pfl eval`` and ``pfl tune``,
never of a federation.
Importing this module registers them as method cores.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from shared.data.synthetic import TOPICS, SyntheticDataset
from shared.errors import PflError
from shared.methods.base import Core, PersonalState, register_core
from shared.methods.perpcs.core import PersonalPieces, perpcs_config, piece_pool
from shared.methods.perpcs.loss_selection import pieces_by_sharer
from shared.methods.perpcs.recipe import Recipe
from shared.metrics import evaluate, is_better

#: (phrase, topic) of every item phrase, longest first (no phrase is a prefix of another).
_PHRASES = sorted(((p, t) for t, ps in TOPICS.items() for p in ps), key=lambda x: -len(x[0]))


def topic_in(text: str) -> str:
    """The topic of the synthetic item an input text (a query or history item) is about."""
    for phrase, topic in _PHRASES:
        if phrase in text:
            return topic
    raise PflError(f"not a synthetic item: {text[:60]!r}")


class _Reference(Core):
    shared_model = False
    federated = False  # it reads what a device does not send (the persona, others' labels)

    def prepare(self, runtime, dataset, augmentation):
        if augmentation.retrieval != "none" or augmentation.profile:
            raise PflError(f"{self.name} uses no prompt: it takes no +rag/+pag")
        self.dataset = dataset

    def personalize(self, runtime, user, augmentation, profile) -> PersonalState:
        return PersonalState(payload=[self.predict(user, query) for query in user.queries])

    def answer(self, runtime, state, prompts, generation, *, desc="generate", progress=False):
        if len(prompts) != len(state.payload):
            raise ValueError(f"{len(prompts)} prompts for {len(state.payload)} queries")
        return list(state.payload)


class _SyntheticReference(_Reference):
    def prepare(self, runtime, dataset, augmentation):
        if not isinstance(dataset, SyntheticDataset):
            raise PflError(f"{self.name} is a reference row of the synthetic task only")
        super().prepare(runtime, dataset, augmentation)


def persona_of(dataset: SyntheticDataset, user):
    """The persona behind a synthetic user (ids are ``syn-{seed}-{index:06d}``)."""
    return dataset.persona(int(user.id.rsplit("-", 1)[1]))


class PersonaOracle(_SyntheticReference):
    name = "oracle"

    def predict(self, user, query) -> str:
        return str(persona_of(self.dataset, user).rating(topic_in(query.input)))


class BestSharer(_SyntheticReference):
    name = "best-sharer"

    def prepare(self, runtime, dataset, augmentation):
        super().prepare(runtime, dataset, augmentation)
        self.sharers = [persona_of(dataset, u) for u in runtime.roles.get("sharers", [])]
        if not self.sharers:
            raise PflError("best-sharer needs sharers: none were assigned")

    def personalize(self, runtime, user, augmentation, profile) -> PersonalState:
        history = [(topic_in(item["text"]), float(item["score"])) for item in user.history]

        def error(persona) -> float:
            return sum(abs(persona.rating(t) - r) for t, r in history) / max(1, len(history))

        best = min(self.sharers, key=error)  # min keeps the first of equal errors
        return PersonalState(payload=[str(best.rating(topic_in(q.input))) for q in user.queries])


class PopulationMean(_SyntheticReference):
    name = "population-mean"

    def prepare(self, runtime, dataset, augmentation):
        super().prepare(runtime, dataset, augmentation)
        ratings = defaultdict(list)
        for user in runtime.roles.get("collective", []):
            for item in user.history:
                ratings[topic_in(item["text"])].append(float(item["score"]))
        if not ratings:
            raise PflError("population-mean needs collective users: none were assigned")
        overall = [r for values in ratings.values() for r in values]
        self.means = {topic: sum(v) / len(v) for topic, v in ratings.items()}
        self.fallback = sum(overall) / len(overall)  # a topic no collective user rated

    def predict(self, user, query) -> str:
        return f"{self.means.get(topic_in(query.input), self.fallback):.2f}"


def history_labels(task, user) -> list[str]:
    """The labels of a user's history items, oldest first, on a classification task whose
    items carry one (PflError otherwise: LaMP-1's items are papers, not citation choices)."""
    if task.kind != "classification":
        raise PflError(f"majority rows need a classification task, not {task.name}")
    labels = [str(item.get(task.output_field, "")).strip().lower() for item in user.history]
    known = set(task.labels)
    if not labels or any(label not in known for label in labels):
        raise PflError(f"{task.name}'s history items do not carry its labels: "
                       "no majority row for it")
    return labels


def most_frequent(labels: list[str]) -> str:
    """The most frequent of ``labels``; ties go to the one seen last (the most recent)."""
    counts = Counter(labels)
    last = {label: i for i, label in enumerate(labels)}
    return max(counts, key=lambda label: (counts[label], last[label]))


class UserMajority(_Reference):
    name = "user-majority"

    def personalize(self, runtime, user, augmentation, profile) -> PersonalState:
        label = most_frequent(history_labels(runtime.task, user))
        return PersonalState(payload=[label] * len(user.queries))


class Majority(_Reference):
    name = "majority"

    def prepare(self, runtime, dataset, augmentation):
        super().prepare(runtime, dataset, augmentation)
        users = runtime.roles.get("collective", [])
        if not users:
            raise PflError("majority needs collective users: none were assigned")
        self.label = most_frequent([label for user in users
                                    for label in history_labels(runtime.task, user)])

    def personalize(self, runtime, user, augmentation, profile) -> PersonalState:
        return PersonalState(payload=[self.label] * len(user.queries))


for _core in (PersonaOracle, PopulationMean, BestSharer, UserMajority, Majority):
    register_core(_core.name, _core)


class PoolOracle(PersonalPieces):
    """``perpcs-oracle``: a cheating upper bound of what PER-PCS' pool can give a target,
    labelled as such. For each target, every sharer's pooled pieces (weight 1, the adapter
    loss routing would pick) answer the target's queries, and the row keeps the sharer whose
    answers score best on them (the task's first metric, against the queries' gold answers;
    ties: the lower pseudonym). No method can do this: it reads the answers it is scored on.
    It tells whether any single sharer of this pool helps a target at all, so that a method
    that does not personalize is explained by evidence. Its cost is one generation pass per
    sharer per target."""

    name = "perpcs-oracle"
    federated = False

    def personalize(self, runtime, user, augmentation, profile) -> PersonalState:
        config = perpcs_config(runtime)
        sharers = pieces_by_sharer(piece_pool(runtime).whole(), config.target_modules)
        if not sharers:
            raise PflError("perpcs-oracle needs a pool with pieces: it is empty")
        recipes = {s: Recipe({p.key: ((p.piece_id, 1.0),) for p in pieces},
                             config.combination, {"method": self.name, "sharer": s},
                             {p.piece_id: s for p in pieces})
                   for s, pieces in sharers.items()}
        return PersonalState(payload={"recipes": recipes,
                                      "golds": [q.gold for q in user.queries]})

    def answer(self, runtime, state, prompts, generation, *, desc="generate", progress=False):
        golds = state.payload["golds"]
        if len(prompts) != len(golds):
            raise ValueError(f"{len(prompts)} prompts for {len(golds)} queries")
        best, best_value, best_answers = None, None, None
        for sharer, recipe in state.payload["recipes"].items():
            answers = super().answer(runtime, PersonalState(payload=recipe), prompts,
                                     generation, desc=desc, progress=False)
            metrics = evaluate(runtime.task, answers, golds)
            metric = next(iter(metrics))
            value = metrics[metric]
            if is_better(metric, value, best_value):
                best, best_value, best_answers = sharer, value, answers
        state.info["sharer"] = best
        return best_answers


register_core(PoolOracle.name, PoolOracle)
