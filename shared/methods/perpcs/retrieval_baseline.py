"""The PEFT-retrieval baseline and the ways PER-PCS picks its sharers.

- :func:`retrieve_sharers` / :func:`peft_retrieval_recipe`: cosine similarity between the
  target's user embedding and each sharer's; the top-k whole sharer adapters, averaged with
  weights proportional to similarity (normalized to sum to 1). Expressed as a
  :class:`~shared.methods.perpcs.recipe.Recipe` over the sharers' pieces, so it is stored and
  rebuilt exactly like a PER-PCS adapter.
- Sharer selection: k-means over user embeddings with the most active user of each cluster
  (clusters whose best user has <= ``small_cluster_items`` items are dropped), or simply the
  most active users. :func:`select_sharers_from_clusters` takes cluster indexes and history
  sizes only, so it also serves federated k-means, where a device reports just those two.

User embeddings (mean sentence-encoder embedding of a user's history) are computed elsewhere;
here they are numpy arrays.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import Key, Piece
from shared.methods.perpcs.recipe import Recipe


# ------------------------------------------------------------------ PEFT retrieval
def cosine_similarities(target: np.ndarray, others: np.ndarray) -> np.ndarray:
    """cos(target, others[i]) for each row (0 for a zero vector)."""
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    others = np.asarray(others, dtype=np.float64).reshape(len(others), -1)
    norms = np.linalg.norm(others, axis=1) * np.linalg.norm(target)
    dots = others @ target
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def retrieve_sharers(target_embedding: np.ndarray, sharer_embeddings: Mapping[str, np.ndarray],
                     top_k: int) -> list[tuple[str, float]]:
    """The ``top_k`` most similar sharers with normalized similarity weights, best first.

    Weights are the cosine similarities of the kept sharers divided by their sum; negative
    similarities count as 0 and if none is positive the kept sharers weigh equally. Ties go to
    the lower sharer pseudonym.
    """
    if not sharer_embeddings:
        raise ValueError("no sharers to retrieve from")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    names = sorted(sharer_embeddings)
    sims = cosine_similarities(target_embedding, np.stack([sharer_embeddings[n] for n in names]))
    order = sorted(range(len(names)), key=lambda i: (-sims[i], names[i]))[:top_k]
    kept = np.clip(sims[order], 0.0, None)
    weights = kept / kept.sum() if kept.sum() > 0 else np.full(len(order), 1.0 / len(order))
    return [(names[i], float(w)) for i, w in zip(order, weights)]


def peft_retrieval_recipe(target_embedding: np.ndarray,
                          sharer_embeddings: Mapping[str, np.ndarray],
                          sharer_pieces: Mapping[str, Sequence[Piece]],
                          config: PerPcsConfig | None = None, *,
                          top_k: int | None = None) -> Recipe:
    """The PEFT-retrieval baseline as a recipe: for each (layer, module), the retrieved
    sharers' pieces with their sharers' weights (``top_k`` defaults to ``config.top_k``).

    Sharers without an adapter (no entry in ``sharer_pieces``) are not candidates. With
    ``config.combination="sum_of_products"`` this is the similarity-weighted average of the
    sharers' Delta W; with "factors" it averages the A and B matrices separately (as an
    averaged peft state dict would).
    """
    config = config or PerPcsConfig()
    candidates = {s: e for s, e in sharer_embeddings.items() if sharer_pieces.get(s)}
    chosen = retrieve_sharers(target_embedding, candidates, top_k or config.top_k)
    entries: dict[Key, list[tuple[str, float]]] = {}
    for sharer, weight in chosen:
        for piece in sharer_pieces[sharer]:
            if piece.module in config.target_modules:
                entries.setdefault(piece.key, []).append((piece.piece_id, weight))
    settings = config.to_dict()
    settings["method"] = "peft-retrieval"
    settings["sharers"] = [[s, w] for s, w in chosen]
    sources = {p.piece_id: s for s in sharer_pieces for p in sharer_pieces[s]}
    return Recipe(entries, config.combination, settings, sources)


# ----------------------------------------------------------------- sharer selection
def kmeans_clusters(embeddings: np.ndarray, num_clusters: int, seed: int = 0) -> np.ndarray:
    """Cluster index per user (sklearn k-means, seeded; K capped at the number of users)."""
    from sklearn.cluster import KMeans

    embeddings = np.asarray(embeddings, dtype=np.float64)
    k = max(1, min(int(num_clusters), len(embeddings)))
    return KMeans(n_clusters=k, random_state=seed, n_init=10).fit_predict(embeddings)


def select_sharers_from_clusters(user_ids: Sequence[str], cluster_ids: Sequence[int],
                                 history_sizes: Sequence[int], *,
                                 small_cluster_items: int = 10) -> list[str]:
    """The most active user of each cluster (ties: the lower user id); a cluster whose most
    active user has ``<= small_cluster_items`` history items is dropped. Sorted by cluster."""
    if not len(user_ids) == len(cluster_ids) == len(history_sizes):
        raise ValueError("user_ids, cluster_ids and history_sizes must have one entry per user")
    best: dict[int, tuple[int, str]] = {}
    for uid, cluster, size in sorted(zip(user_ids, cluster_ids, history_sizes),
                                     key=lambda row: (int(row[1]), -int(row[2]), row[0])):
        best.setdefault(int(cluster), (int(size), uid))  # the first row is the best
    return [uid for cluster, (size, uid) in sorted(best.items()) if size > small_cluster_items]


def select_sharers_kmeans(user_ids: Sequence[str], embeddings: np.ndarray,
                          history_sizes: Sequence[int], config: PerPcsConfig | None = None, *,
                          seed: int = 0) -> list[str]:
    """PER-PCS sharer selection: k-means with K = ``config.clusters_for(len(users))`` over the
    user embeddings, then the most active user per cluster, dropping small clusters."""
    config = config or PerPcsConfig()
    clusters = kmeans_clusters(embeddings, config.clusters_for(len(user_ids)), seed)
    return select_sharers_from_clusters(user_ids, clusters, history_sizes,
                                        small_cluster_items=config.small_cluster_items)


def select_sharers_most_active(user_ids: Sequence[str], history_sizes: Sequence[int],
                               num_sharers: int) -> list[str]:
    """The ``num_sharers`` users with the most history items (ties: the lower user id)."""
    if len(user_ids) != len(history_sizes):
        raise ValueError("user_ids and history_sizes must have one entry per user")
    order = sorted(zip(user_ids, history_sizes), key=lambda us: (-int(us[1]), us[0]))
    return [uid for uid, _ in order[: max(0, int(num_sharers))]]
