"""LaMP-style per-author tasks from the HuffPost News Category dataset.

An author is a user. Their articles, sorted by date (file order breaks ties), are split in
time as LaMP does: the latest ``queries_per_user`` are queries, and the history is the
articles strictly older than the earliest query (same-day articles are left out).
``news-headline`` asks for the headline of an article (LaMP-4 style); ``news-category`` for its
category (LaMP-2N style) over the sorted, lowercased categories of the whole file.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from shared.data.base import InMemoryDataset
from shared.errors import PflError
from shared.tasks import NEWS_HEADLINE, TaskSpec, news_category
from shared.types import HistoryItem, Query, User

FILENAME = "News_Category_Dataset_v3.jsonl"
KEYS = ("headline", "category", "short_description", "authors", "date")


def author_id(author: str) -> str:
    """A stable pseudonym for an author name."""
    return "hp-" + hashlib.sha256(author.encode("utf-8")).hexdigest()[:10]


def _item_id(article: dict, line_no: int) -> str:
    link = str(article.get("link") or "")
    return hashlib.sha256(link.encode()).hexdigest()[:12] if link else f"line{line_no}"


def resolve_path(path: str | Path) -> Path:
    """The .jsonl file for a file or a directory holding :data:`FILENAME`."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
        if not p.is_file():
            raise PflError(f"no {FILENAME} in directory {path}")
    elif not p.is_file():
        raise PflError(f"HuffPost data not found: {path}")
    return p


def read_articles(path: Path) -> list[tuple[int, dict]]:
    """(line number, article) for every non-blank line; PflError on bad JSON or missing keys."""
    articles = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PflError(f"{path}: line {line_no} is not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                article = json.loads(line)
            except RecursionError:
                raise PflError(f"{path}: line {line_no} is JSON nested too deeply") from None
            except json.JSONDecodeError as e:
                raise PflError(f"{path}: invalid JSON at line {line_no} column {e.colno}: "
                               f"{e.msg}") from None
            if not isinstance(article, dict):
                raise PflError(f"{path}: line {line_no} is not a JSON object")
            missing = [k for k in KEYS if k not in article]
            if missing:
                raise PflError(f"{path}: line {line_no} lacks {', '.join(missing)} "
                               f"(expected HuffPost keys {', '.join(KEYS)})")
            articles.append((line_no, article))
    return articles


def load_huffpost(path: str | Path, task: str = "news-headline", *, min_history: int = 10,
                  queries_per_user: int = 1) -> InMemoryDataset:
    """Per-author users of ``task`` ("news-headline" or "news-category") from ``path``.

    Authors with fewer than ``min_history`` history items are dropped; users are ordered by
    history size (descending), then id.
    """
    if task not in ("news-headline", "news-category"):
        raise PflError(f"unknown HuffPost task {task!r}; known: news-headline, news-category")
    if queries_per_user < 1:
        raise PflError(f"queries_per_user must be at least 1, got {queries_per_user}")
    file = resolve_path(path)
    articles = read_articles(file)
    if not articles:
        raise PflError(f"{file}: no articles (the file is empty)")
    labels = tuple(sorted({str(a["category"]).strip().lower() for _, a in articles}))
    spec: TaskSpec = NEWS_HEADLINE if task == "news-headline" else news_category(labels)

    by_author: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line_no, a in articles:
        author = str(a["authors"] or "").strip()
        if author and str(a["short_description"] or "").strip():
            by_author[author].append((line_no, a))

    users = []
    for author, items in by_author.items():
        items.sort(key=lambda la: (str(la[1]["date"]), la[0]))  # by date, then file order
        if len(items) <= queries_per_user:
            continue
        queries = items[-queries_per_user:]
        # the history is strictly older than the earliest query: an article of the same day
        # is neither history nor query
        first = str(queries[0][1]["date"])
        history = [item for item in items[:-queries_per_user] if str(item[1]["date"]) < first]
        if len(history) < min_history:
            continue
        users.append(_user(spec, author, history, queries))
    users.sort(key=lambda u: (-len(u.history), u.id))
    return InMemoryDataset(spec, users, f"huffpost/{spec.name}")


def _user(spec: TaskSpec, author: str, history_items: list[tuple[int, dict]],
          query_items: list[tuple[int, dict]]) -> User:
    def fields(a: dict) -> dict[str, str]:
        return {"text": str(a["short_description"]).strip(), "title": str(a["headline"]).strip(),
                "category": str(a["category"]).strip().lower()}

    history = tuple(HistoryItem(_item_id(a, n), fields(a)) for n, a in history_items)
    queries = []
    for n, a in query_items:
        f = fields(a)
        queries.append(Query(_item_id(a, n), spec.format_input(f["text"]), f[spec.output_field]))
    return User(author_id(author), history, tuple(queries))
