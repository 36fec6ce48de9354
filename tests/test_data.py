"""Loaders and dataset abstraction: LaMP files, HuffPost per-author tasks, synthetic personas."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from shared.data import (Dataset, InMemoryDataset, SyntheticDataset, dataset_stats, format_stats,
                         load_dataset)
from shared.data.huffpost import author_id
from shared.data.synthetic import TOPIC_NAMES, persona, topic_of
from shared.errors import PflError
from shared.tasks import LAMP_2_MOVIE, LAMP_2_NEWS, LAMP_3, LAMP_4, NEWS_HEADLINE, SYNTHETIC
from shared.types import HistoryItem, Query, User

HUFFPOST_DIR = Path(__file__).resolve().parents[2] / "shared/data/huffpost"


# ------------------------------------------------------------------------------ LaMP fixtures
def _write_lamp(root: Path, task: str, split: str, questions: list, golds: list | None) -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    q = folder / f"{split}_questions.json"
    q.write_text(json.dumps(questions, indent=1))
    if golds is not None:
        (folder / f"{split}_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return q


def _lamp2_questions(n: int = 3) -> list:
    return [{"id": f"2{u}0", "input": LAMP_2_MOVIE.format_input(f"a movie number {u}"),
             "profile": [{"tag": "comedy", "description": f"funny film {u}.{j}", "id": f"2{u}{j}"}
                         for j in range(4 + u)]} for u in range(n)]


def _news(text: str, title: str, item_id: str, date: str) -> dict:
    return {"text": text, "title": title, "id": item_id, "date": date}


def _lamp4_questions() -> list:
    return [{"id": "410", "input": "Generate a headline for the following article: storm hits",
             "profile": [_news("later piece", "Later", "411", "2015-03-02"),
                         _news("early piece", "Early", "412", "2014-01-09"),
                         _news("mid piece", "Mid", "413", "2014-07-30")]},
            {"id": "420", "input": "Generate a headline for the following article: vote today",
             "profile": [_news("only piece", "Only", "421", "2016-05-05")]}]


@pytest.fixture
def lamp4_dir(tmp_path: Path) -> Path:
    root = tmp_path / "LaMP_4"
    _write_lamp(root, "LaMP_4", "dev", _lamp4_questions(),
                [{"id": "410", "output": "Storm Hits Coast"},
                 {"id": "420", "output": "Vote Today"}])
    return root


def test_lamp4_directory_form_sorts_profile_by_date(lamp4_dir: Path):
    ds = load_dataset("LaMP-4", str(lamp4_dir), split="dev")
    assert ds.task is LAMP_4 and len(ds) == 2
    user = ds.user(0)
    assert user.id == "410"
    assert [h.id for h in user.history] == ["412", "413", "411"]  # chronological
    assert user.history[0].fields == {"text": "early piece", "title": "Early", "date": "2014-01-09"}
    assert user.queries == (Query("410", _lamp4_questions()[0]["input"], "Storm Hits Coast"),)
    assert LAMP_4.history_example(user.history[0]) == (
        "Generate a headline for the following article: early piece", "Early")


def test_lamp_file_form_aliases_and_user_limit(lamp4_dir: Path):
    file = lamp4_dir / "dev" / "dev_questions.json"
    ds = load_dataset("lamp4", file, users=1)
    assert [u.id for u in ds.users()] == ["410"]
    assert ds.user(0).queries[0].gold == "Storm Hits Coast"
    assert len(load_dataset("LaMP_4", file, min_history=2)) == 1  # user 420 has 1 item


def test_lamp2_movie_and_news_variants(tmp_path: Path):
    q = _write_lamp(tmp_path / "movies", "LaMP_2", "train", _lamp2_questions(),
                    [{"id": f"2{u}0", "output": "comedy"} for u in range(3)])
    ds = load_dataset("LaMP-2", q)
    assert ds.task is LAMP_2_MOVIE
    assert [len(u.history) for u in ds] == [4, 5, 6]  # no dates: file order kept
    assert [h.id for h in ds.user(0).history] == ["200", "201", "202", "203"]
    assert ds.user(2).history[1]["description"] == "funny film 2.1"

    news = [{"id": "9", "input": LAMP_2_NEWS.format_input("x"),
             "profile": [{"text": "t", "title": "T", "category": "sports", "id": "91"}]}]
    q = _write_lamp(tmp_path / "news", "LaMP_2", "dev", news, [{"id": "9", "output": "sports"}])
    assert load_dataset("LaMP-2", q).task is LAMP_2_NEWS


def test_lamp3_test_split_without_outputs(tmp_path: Path):
    questions = [{"id": "31", "input": LAMP_3.format_input("great"),
                  "profile": [{"text": "meh", "score": 3, "id": "3a"},
                              {"text": "bad", "score": "1", "id": "3b"}]}]
    _write_lamp(tmp_path / "LaMP_3", "LaMP_3", "test", questions, golds=None)
    ds = load_dataset("LaMP-3", tmp_path, split="test")
    user = ds.user(0)
    assert user.queries[0].gold is None
    assert [h["score"] for h in user.history] == ["3", "1"]  # fields are strings
    assert LAMP_3.render_context(user.history[0]) == '3 is the score for "meh"'


def test_lamp_directory_with_several_tasks_picks_the_task_folder(tmp_path: Path, lamp4_dir):
    _write_lamp(tmp_path / "LaMP_2", "LaMP_2", "dev", _lamp2_questions(1),
                [{"id": "200", "output": "comedy"}])
    assert load_dataset("LaMP-4", tmp_path).task is LAMP_4
    assert load_dataset("LaMP-2", tmp_path).task is LAMP_2_MOVIE


@pytest.mark.parametrize("content, needle", [
    ('[{"id": "1", "input": "x", "profile": []},\n  {"id": oops}]',
     "invalid JSON at line 2 column 10"),
    ('{"id": "1"}', "expected a JSON list"),
    ('[{"id": "1", "profile": []}]', "lacks 'input'"),
    ('[{"id": "1", "input": "x"}]', "lacks 'profile'"),
    ('[{"id": "1", "input": "x", "profile": [{"text": "no title"}]}]',
     "lacks 'title' needed by LaMP-4"),
    ('[{"id": "1", "input": "x", "profile": [{"title": "no text"}]}]',
     "lacks 'text' needed by LaMP-4"),
])
def test_lamp_malformed_questions(tmp_path: Path, content: str, needle: str):
    q = tmp_path / "dev_questions.json"
    q.write_text(content)
    with pytest.raises(PflError) as err:
        load_dataset("LaMP-4", q)
    message = str(err.value)
    assert needle in message and str(q) in message and "\n" not in message


def test_lamp_outputs_problems(lamp4_dir: Path):
    outputs = lamp4_dir / "dev" / "dev_outputs.json"
    outputs.write_text(json.dumps({"task": "LaMP_4", "golds": [{"id": "410", "output": "S"}]}))
    with pytest.raises(PflError, match="no gold for question id 420"):
        load_dataset("LaMP-4", lamp4_dir)
    outputs.write_text(json.dumps({"task": "LaMP_3", "golds": []}))
    with pytest.raises(PflError, match="golds of LaMP_3, not LaMP-4"):
        load_dataset("LaMP-4", lamp4_dir)
    outputs.write_text('{"task": "LaMP_4", "golds": [}')
    with pytest.raises(PflError, match=r"dev_outputs.json: invalid JSON at line 1 column"):
        load_dataset("LaMP-4", lamp4_dir)


def test_path_and_task_errors(tmp_path: Path):
    with pytest.raises(PflError, match="not found: .*nowhere"):
        load_dataset("LaMP-4", tmp_path / "nowhere")
    with pytest.raises(PflError, match=r"no dev_questions.json under directory"):
        load_dataset("LaMP-4", tmp_path)
    with pytest.raises(PflError, match="needs a data path"):
        load_dataset("news-headline", None)
    with pytest.raises(PflError, match=r"no News_Category_Dataset_v3.jsonl in directory"):
        load_dataset("news-category", tmp_path)
    with pytest.raises(PflError, match="unknown task 'LaMP-9'; known: LaMP-1, .*synthetic"):
        load_dataset("LaMP-9", tmp_path)
    with pytest.raises(PflError, match="one query per user"):
        load_dataset("LaMP-4", tmp_path, queries_per_user=3)


# --------------------------------------------------------------------------- HuffPost fixtures
def _article(author: str, day: int, n: int, category: str = "POLITICS", desc: str | None = None):
    return {"link": f"https://example.org/{author or 'anon'}/{n}",
            "headline": f"{author} headline {n}", "category": category,
            "short_description": f"{author} text {n}" if desc is None else desc,
            "authors": author, "date": f"2020-01-{day:02d}"}


@pytest.fixture
def huffpost_file(tmp_path: Path) -> Path:
    rows = [_article("Ann", 20 - n, n, "WELLNESS" if n % 2 else "Politics") for n in range(12)]
    rows.insert(5, _article("Ann", 25, 99, desc=""))  # latest, but no text: skipped
    rows.append(_article("Ann", 8, 12))  # last in the file, but Ann's oldest article
    rows += [_article("Bob", d, d, "SPORTS") for d in range(1, 6)]  # too little history
    rows += [_article("", d, d, "TRAVEL") for d in range(1, 20)]  # no author: skipped
    rows += [_article("Cy", d, d) for d in range(1, 13)]
    path = tmp_path / "News_Category_Dataset_v3.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_huffpost_headline_users_and_time_split(huffpost_file: Path):
    ds = load_dataset("news-headline", huffpost_file.parent)  # directory form
    assert ds.task is NEWS_HEADLINE
    assert [u.id for u in ds] == [author_id("Ann"), author_id("Cy")]  # 12 history > 11
    ann = ds.user(0)
    assert len(ann.history) == 12 and len(ann.queries) == 1
    # Ann's dates run from day 20 (n=0) down to day 9 (n=11), then day 8 (n=12).
    assert ann.history[0]["title"] == "Ann headline 12"
    assert ann.queries[0].gold == "Ann headline 0"
    assert ann.queries[0].input == NEWS_HEADLINE.format_input("Ann text 0")
    assert ann.history[-1].fields == {"text": "Ann text 1", "title": "Ann headline 1",
                                      "category": "wellness"}
    assert all(h["text"] for h in ann.history)


def test_huffpost_ties_keep_file_order_and_history_is_strictly_older(tmp_path: Path):
    days = [1, 1, 2, 3, 4, 4, 4]  # articles 4, 5 and 6 are of the same day
    rows = [_article("Dee", day, n) for n, day in enumerate(days)]
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    user = load_dataset("news-headline", path, min_history=3, queries_per_user=2).user(0)
    assert [q.gold for q in user.queries] == ["Dee headline 5", "Dee headline 6"]
    # article 4 is as old as the earliest query: neither history nor query
    assert [h["title"] for h in user.history] == [f"Dee headline {n}" for n in range(4)]
    assert not list(load_dataset("news-headline", path, min_history=5, queries_per_user=2))


def test_huffpost_category_labels_filters_and_limit(huffpost_file: Path):
    ds = load_dataset("news-category", huffpost_file, min_history=4)
    assert ds.task.labels == ("politics", "sports", "travel", "wellness")  # whole file
    assert len(ds) == 3 and ds.user(2).id == author_id("Bob")  # Bob: 4 history items
    assert ds.user(0).queries[0].gold == "politics"
    assert "categories: [politics, sports, travel, wellness]" in ds.user(0).queries[0].input
    first = load_dataset("news-category", huffpost_file, users=1)
    assert [u.id for u in first] == [author_id("Ann")]


def test_huffpost_malformed(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_article("A", 1, 1)) + "\n{not json\n")
    with pytest.raises(PflError, match=r"bad.jsonl: invalid JSON at line 2 column 2"):
        load_dataset("news-headline", path)
    path.write_text(json.dumps({"headline": "h"}) + "\n")
    with pytest.raises(PflError, match="line 1 lacks category, short_description, authors, date"):
        load_dataset("news-headline", path)


def test_real_huffpost_file():
    file = HUFFPOST_DIR / "News_Category_Dataset_v3.jsonl"
    if not file.is_file():
        pytest.skip(f"HuffPost data not found at {file}")
    ds = load_dataset("news-headline", HUFFPOST_DIR, min_history=10)
    assert len(ds) >= 20
    sizes = [len(u.history) for u in ds]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= 10
    dates = {}
    for line in file.read_text().splitlines():
        a = json.loads(line)
        dates[(a["short_description"].strip(), a["headline"].strip())] = a["date"]
    for user in ds:
        history_dates = [dates[(h["text"], h["title"])] for h in user.history]
        assert history_dates == sorted(history_dates)
        query_text = user.queries[0].input.split("article: ", 1)[1]
        assert dates[(query_text, user.queries[0].gold)] > max(history_dates)
    top20 = load_dataset("news-category", HUFFPOST_DIR, users=20)
    assert [u.id for u in top20] == [u.id for u in ds.users(20)]
    assert len(top20.task.labels) >= 20
    assert all(u.queries[0].gold in top20.task.labels for u in top20)


# ---------------------------------------------------------------------------------- synthetic
def test_synthetic_is_lazy_and_deterministic():
    start = time.perf_counter()
    a = load_dataset("synthetic", None, num_users=100_000, seed=3)
    b = SyntheticDataset(100_000, seed=3)
    last = a.user(99_999)
    assert time.perf_counter() - start < 1.0
    assert len(a) == 100_000 and last == b.user(99_999) == a.user(-1)
    assert a.user(5) != a.user(6)
    assert SyntheticDataset(10, seed=4).user(5) != b.user(5)
    assert len(load_dataset("synthetic", None, users=7)) == 7
    with pytest.raises(IndexError):
        a.user(100_000)


def test_synthetic_users_shape():
    ds = load_dataset("synthetic", None, num_users=50)
    assert ds.task is SYNTHETIC
    sizes = set()
    for user in ds:
        assert 8 <= len(user.history) <= 40 and len(user.queries) == 2
        sizes.add(len(user.history))
        for item in user.history:
            assert set(item.fields) == {"text", "score"} and item["score"] in "12345"
            assert topic_of(item["text"]) in TOPIC_NAMES
        for q in user.queries:
            assert q.input.startswith(SYNTHETIC.format_input("")) and q.gold in "12345"
    assert len(sizes) > 5
    assert min(len(u.history) for u in load_dataset("synthetic", None, num_users=20,
                                                     min_history=30)) >= 30


def test_synthetic_ratings_are_learnable_and_personal():
    ds = SyntheticDataset(200, seed=0)
    agree = total = 0
    for i, user in enumerate(ds):
        who = persona(0, i)
        by_topic = defaultdict(list)
        for item in user.history + tuple(
                HistoryItem(q.id, {"text": q.input, "score": q.gold}) for q in user.queries):
            text = item["text"].split("item: ", 1)[-1]
            by_topic[topic_of(text)].append(int(item["score"]))
        for topic, scores in by_topic.items():
            assert topic in who.interests
            agree += sum(s == who.rating(topic) for s in scores)
            total += len(scores)
            assert all(abs(s - who.rating(topic)) <= 1 for s in scores)
    assert agree / total > 0.85  # same persona + same topic: same rating, bar rare noise
    # Users disagree: for a topic, the noiseless ratings of different personas vary.
    ratings = Counter(persona(0, i).rating("jazz") for i in range(200))
    assert len(ratings) == 5 and max(ratings.values()) < 100
    assert len({persona(0, i).style for i in range(200)}) == 4


# -------------------------------------------------------------------------------- abstraction
def _toy() -> InMemoryDataset:
    users = [User(f"u{k}", tuple(HistoryItem(f"h{j}", {"text": "t", "score": "1"})
                                 for j in range(k)), (Query(f"q{k}", "in", "1"),) * (k % 2 + 1))
             for k in (3, 1, 4, 1, 5)]
    return InMemoryDataset(LAMP_3, users, "toy")


def test_dataset_stats_and_format():
    ds = _toy()
    assert isinstance(ds, Dataset) and len(ds) == 5 and ds.user(1).id == "u1"
    stats = dataset_stats(ds)
    assert stats == {"task": "LaMP-3", "users": 5, "queries": 9,
                     "history_per_user": {"min": 1, "median": 3, "max": 5, "mean": 2.8}}
    assert dataset_stats(ds, limit=2)["history_per_user"]["median"] == 2  # (3 + 1) / 2
    assert dataset_stats(ds.head(0))["users"] == 0
    text = format_stats(stats)
    assert "LaMP-3" in text and "median 3" in text and "mean 2.8" in text
    assert [u.id for u in ds.users(limit=3)] == ["u3", "u1", "u4"]


def test_stats_stream_over_a_lazy_dataset():
    ds = SyntheticDataset(100_000, seed=1)
    stats = dataset_stats(ds, limit=300)
    assert stats["users"] == 300 and stats["queries"] == 600
    assert 8 <= stats["history_per_user"]["min"] <= stats["history_per_user"]["median"] <= 40
    assert len(ds.head(10)) == 10 and ds.head(10).user(9) == ds.user(9)
