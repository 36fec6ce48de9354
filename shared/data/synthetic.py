"""Synthetic persona users for the out-of-the-box demo and for simulations of many clients.

Each user is a *persona*: a handful of topics it is interested in, a preference (1-5) for
every topic and a rater style (neutral, harsh, generous or extreme). Items are short phrases
from a topic's vocabulary plus a generic suffix ("a trail guide to the alpine lakes, bought on
sale"). The rating of an item is a deterministic function of persona and topic, flipped by one
step with a small probability, so a model can learn it from the user's history, and users
disagree with each other.

Everything derives from ``(seed, user_index)``: the dataset is lazy, ``user(i)`` is built on
demand, and any number of users costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.base import Dataset
from shared.errors import PflError
from shared.tasks import SYNTHETIC
from shared.types import HistoryItem, Query, User

TOPICS: dict[str, tuple[str, ...]] = {
    "hiking": ("a trail guide to the alpine lakes", "a lightweight two-person tent",
               "a pair of waterproof hiking boots", "a headlamp for night treks",
               "a weekend ridge walk in the national park"),
    "cooking": ("a cast-iron skillet", "a cookbook of quick weeknight pastas",
                "a class on knife skills", "a set of Japanese chef knives",
                "a spice blend for slow-cooked curries"),
    "sci-fi": ("a novel about a generation starship", "a film about time loops on Mars",
               "a short story anthology of first contact", "a series about rogue androids",
               "a graphic novel set on a ringworld"),
    "jazz": ("a live bebop record from a small club", "a biography of a swing-era trumpeter",
             "a vinyl reissue of a modal jazz classic", "a ticket to a late-night trio concert",
             "a course on jazz piano voicings"),
    "gardening": ("a raised bed kit for tomatoes", "a book on growing heirloom roses",
                  "a set of pruning shears", "a seed box of native wildflowers",
                  "a compost bin for a small yard"),
    "gaming": ("a cooperative board game about islands", "an open-world role-playing game",
               "a mechanical keyboard for fast play", "a retro console with classic cartridges",
               "a strategy game about building railways"),
    "fitness": ("a pair of adjustable dumbbells", "a twelve-week marathon plan",
                "a yoga mat with alignment lines", "a spin class pass",
                "a heart-rate monitoring watch"),
    "history": ("a documentary on the Roman aqueducts", "a book on the Silk Road trade",
                "a museum tour of medieval armour", "a podcast about the space race",
                "an atlas of ancient empires"),
}
TOPIC_NAMES = tuple(TOPICS)
SUFFIXES = ("bought on sale", "recommended by a friend", "from a small local shop",
            "with glowing online reviews", "picked up last weekend", "received as a gift",
            "after a long search", "from a well-known brand")
STYLES = ("neutral", "harsh", "generous", "extreme")
NOISE = 0.1  # probability that a rating moves one step from the persona's rule


@dataclass(frozen=True)
class Persona:
    """What decides a synthetic user's ratings."""

    interests: tuple[str, ...]  # topics its items come from
    preference: dict[str, int]  # topic -> 1..5, for every topic
    style: str

    def rating(self, topic: str) -> int:
        """The noiseless rating this persona gives an item of ``topic``."""
        p = self.preference[topic]
        if self.style == "harsh":
            return max(1, p - 1)
        if self.style == "generous":
            return min(5, p + 1)
        if self.style == "extreme":
            return 5 if p >= 3 else 1
        return p


def persona(seed: int, index: int) -> Persona:
    """The persona of user ``index`` for ``seed`` (independent of history sizes)."""
    rng = np.random.default_rng([seed, index, 0])
    k = int(rng.integers(2, 5))  # 2..4 interests
    chosen = sorted(rng.choice(len(TOPIC_NAMES), k, replace=False))
    interests = tuple(TOPIC_NAMES[j] for j in chosen)
    preference = {t: int(v) for t, v in zip(TOPIC_NAMES, rng.integers(1, 6, len(TOPIC_NAMES)))}
    return Persona(interests, preference, STYLES[int(rng.integers(len(STYLES)))])


class SyntheticDataset(Dataset):
    """``num_users`` persona users built on demand from ``(seed, index)``.

    History sizes are drawn per user from ``min_history..max_history``; each user has
    ``queries_per_user`` queries on its interest topics. Item fields: ``text``, ``score``
    ("1".."5"); query gold = score.
    """

    def __init__(self, num_users: int = 1000, *, seed: int = 0, queries_per_user: int = 2,
                 min_history: int = 8, max_history: int = 40):
        if num_users < 0 or queries_per_user < 0 or min_history < 0:
            raise PflError("synthetic data needs num_users, queries_per_user and min_history >= 0")
        self.task = SYNTHETIC
        self.name = f"synthetic(seed={seed})"
        self.num_users, self.seed = int(num_users), int(seed)
        self.queries_per_user = int(queries_per_user)
        self.min_history = int(min_history)
        self.max_history = max(int(max_history), self.min_history)

    def __len__(self) -> int:
        return self.num_users

    def persona(self, i: int) -> Persona:
        return persona(self.seed, i)

    def _user(self, i: int) -> User:
        who = persona(self.seed, i)
        rng = np.random.default_rng([self.seed, i, 1])
        n_hist = int(rng.integers(self.min_history, self.max_history + 1))
        n = n_hist + self.queries_per_user
        topics = rng.integers(len(who.interests), size=n)
        phrases = rng.random(n)  # index into the topic's phrase list
        suffixes = rng.integers(len(SUFFIXES), size=n)
        noise = rng.random(n) < NOISE
        steps = rng.choice((-1, 1), size=n)
        uid = f"syn-{self.seed}-{i:06d}"
        items = []
        for j in range(n):
            topic = who.interests[topics[j]]
            score = who.rating(topic)
            if noise[j]:
                score = min(5, max(1, score + int(steps[j])))
            vocab = TOPICS[topic]
            text = f"{vocab[int(phrases[j] * len(vocab))]}, {SUFFIXES[suffixes[j]]}"
            items.append((text, str(score)))
        history = tuple(HistoryItem(f"{uid}-h{j}", {"text": t, "score": s})
                        for j, (t, s) in enumerate(items[:n_hist]))
        queries = tuple(Query(f"{uid}-q{j}", SYNTHETIC.format_input(t), s)
                        for j, (t, s) in enumerate(items[n_hist:]))
        return User(uid, history, queries)


def topic_of(text: str) -> str | None:
    """The topic whose vocabulary an item text comes from (None if none)."""
    for topic, phrases in TOPICS.items():
        if any(text.startswith(p) for p in phrases):
            return topic
    return None
