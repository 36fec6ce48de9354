"""The official LaMP benchmark files (tasks 1-7, user- or time-based splits).

``{split}_questions.json`` is a list of ``{"id", "input", "profile": [{...}, ...]}``;
``{split}_outputs.json`` is ``{"task": "LaMP_4", "golds": [{"id", "output"}, ...]}`` (absent
for the test split). Each question is one user with one query, as LaMP defines users; its
profile is the history (sorted by ``date`` where every item has one).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Iterator

from shared.data.base import InMemoryDataset
from shared.errors import PflError
from shared.tasks import LAMP_2_MOVIE, LAMP_2_NEWS, TaskSpec
from shared.types import HistoryItem, Query, User

SPLITS = ("train", "dev", "test")


# ----------------------------------------------------------------------------- locating files
def find_questions(path: str | Path, split: str = "dev", task: TaskSpec | None = None) -> Path:
    """The questions file: ``path`` itself, or the one ``{split}_questions.json`` under it."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise PflError(f"LaMP data not found: {path}")
    if split not in SPLITS:
        raise PflError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    name = f"{split}_questions.json"
    found = sorted(p.rglob(name))
    if len(found) > 1 and task is not None:  # e.g. a folder holding LaMP_1 ... LaMP_7
        number = re.escape(_task_number(task.name))
        mine = [f for f in found
                if re.search(rf"lamp[-_ ]?{number}(?![0-9])", str(f.relative_to(p)), re.I)]
        found = mine or found
    if not found:
        raise PflError(f"no {name} under directory {path}")
    if len(found) > 1:
        shown = ", ".join(str(f) for f in found[:3]) + (" ..." if len(found) > 3 else "")
        raise PflError(f"{len(found)} files named {name} under {path} ({shown}); "
                       f"give the questions file itself")
    return found[0]


def outputs_path(questions: Path) -> Path:
    """``dev_questions.json`` -> ``dev_outputs.json`` (the last "questions" in the name)."""
    name = questions.name
    i = name.rfind("questions")
    if i < 0:
        raise PflError(f"{questions}: not a LaMP questions file (name lacks 'questions')")
    return questions.with_name(name[:i] + "outputs" + name[i + len("questions"):])


def _task_number(name: str) -> str:
    match = re.search(r"\d+", name)
    return match.group(0) if match else ""


# ------------------------------------------------------------------------------- JSON reading
def _json_error(path: Path, e: json.JSONDecodeError) -> PflError:
    return PflError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PflError(f"cannot read {path}: {e}") from None


def iter_json_array(path: Path) -> Iterator[dict]:
    """Elements of a top-level JSON array, decoded one at a time (stop early = parse less)."""
    text, decoder = _read_text(path), json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if text[pos:pos + 1] != "[":
        error = json.JSONDecodeError("expected a JSON list of questions", text, pos)
        raise _json_error(path, error)
    pos = ws.match(text, pos + 1).end()
    if text[pos:pos + 1] == "]":
        return
    while True:
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            raise PflError(f"{path}: JSON nested too deeply to be a LaMP file") from None
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        yield obj
        pos = ws.match(text, pos).end()
        if text[pos:pos + 1] == "]":
            return
        if text[pos:pos + 1] != ",":
            raise _json_error(path, json.JSONDecodeError("expected ',' or ']'", text, pos))
        pos = ws.match(text, pos + 1).end()


def read_golds(path: Path, task: TaskSpec) -> dict[str, str]:
    """id -> gold output from an outputs file; checks it is for ``task``."""
    try:
        data = json.loads(_read_text(path))
    except RecursionError:
        raise PflError(f"{path}: JSON nested too deeply to be a LaMP outputs file") from None
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise PflError(f"{path}: expected an object with a 'golds' list")
    declared = str(data.get("task", ""))
    if declared and _task_number(declared) != _task_number(task.name):
        raise PflError(f"{path} holds golds of {declared}, not {task.name}")
    golds = {}
    for g in data["golds"]:
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise PflError(f"{path}: every gold needs 'id' and 'output', got {str(g)[:80]}")
        golds[str(g["id"])] = str(g["output"])
    return golds


# ------------------------------------------------------------------------------------ loading
def load_lamp(path: str | Path, task: TaskSpec, *, split: str = "dev", min_history: int = 0,
              users: int | None = None) -> InMemoryDataset:
    """Users of LaMP ``task`` from a questions file or a directory holding ``{split}_...``.

    ``users`` stops after that many users (only those are parsed); ``min_history`` drops
    users whose profile is smaller. For LaMP-2, profiles with ``category`` items switch the
    spec to LaMP-2N.
    """
    questions = find_questions(path, split, task)
    outputs = outputs_path(questions)
    golds = read_golds(outputs, task) if outputs.is_file() else None
    result: list[User] = []
    for q in iter_json_array(questions):
        if users is not None and len(result) >= users:
            break
        _check_question(questions, q)
        if task.name == LAMP_2_MOVIE.name and q["profile"] and "category" in q["profile"][0] \
                and "tag" not in q["profile"][0]:
            task = LAMP_2_NEWS
        user = _user(questions, task, q, golds, outputs)
        if len(user.history) >= min_history:
            result.append(user)
    return InMemoryDataset(task, result, f"{task.name}/{questions.stem.replace('_questions', '')}")


def _check_question(path: Path, q) -> None:
    if not isinstance(q, dict):
        raise PflError(f"{path}: each question must be an object, got {str(q)[:60]}")
    for key in ("id", "input", "profile"):
        if key not in q:
            raise PflError(f"{path}: question {q.get('id', '?')} lacks {key!r} "
                           f"(expected keys id, input, profile)")
    if not isinstance(q["profile"], list):
        raise PflError(f"{path}: question {q['id']}: 'profile' must be a list")


def _user(path: Path, task: TaskSpec, q: dict, golds: dict[str, str] | None,
          outputs: Path) -> User:
    qid = str(q["id"])
    needed = [f for f in (task.input_field, task.output_field) if f]
    history = []
    for j, item in enumerate(q["profile"]):
        if not isinstance(item, dict):
            raise PflError(f"{path}: question {qid}: profile item {j} is not an object")
        missing = [f for f in needed if f not in item]
        if missing:
            raise PflError(f"{path}: question {qid}: profile item {j} lacks {missing[0]!r} "
                           f"needed by {task.name} (has {', '.join(sorted(item)) or 'nothing'})")
        fields = {k: "" if v is None else str(v) for k, v in item.items() if k != "id"}
        history.append(HistoryItem(str(item.get("id", f"{qid}-{j}")), fields))
    history = _chronological(history)
    if golds is not None and qid not in golds:
        raise PflError(f"{outputs} has no gold for question id {qid} of {path} "
                       f"(questions and outputs do not match)")
    gold = golds[qid] if golds is not None else None
    return User(qid, tuple(history), (Query(qid, str(q["input"]), gold),))


def _chronological(items: list[HistoryItem]) -> list[HistoryItem]:
    """Sorted by ``date`` (stable) when every item has one, else unchanged."""
    if not items or any(not it.get("date") for it in items):
        return items
    dates = [it["date"] for it in items]
    parsed = [_parse_date(d) for d in dates]
    keys = parsed if all(p is not None for p in parsed) else dates
    order = sorted(range(len(items)), key=lambda i: keys[i])
    return [items[i] for i in order]


def _parse_date(text: str) -> datetime | None:
    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return d.replace(tzinfo=None)
