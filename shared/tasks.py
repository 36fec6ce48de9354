"""Task specifications: how a task's items become prompts, training examples and retrieval text.

One :class:`TaskSpec` per task. The LaMP tasks follow the LaMP benchmark's own input strings,
label lists and retrieved-item formats; ``news-headline`` and ``news-category`` are LaMP-4 and
LaMP-2N built from HuffPost; ``synthetic`` is the persona rating task of
:mod:`shared.data.synthetic`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from shared.errors import PflError
from shared.types import HistoryItem

Kind = Literal["classification", "rating", "generation"]

LAMP2_MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
LAMP2_NEWS_CATEGORIES = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics", "crime",
    "culture & arts", "religion",
)
RATING_LABELS = ("1", "2", "3", "4", "5")


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific that prompts, training, retrieval and metrics need.

    - ``instruction`` formats a task input from an item's ``input_field`` (``{input}``) and the
      label list (``{labels}``); queries already carry this string as :attr:`Query.input`.
    - ``history_example`` turns a history item into a (prompt, target) training example in the
      task's own format; items with no output field train on their text as target.
    - ``context_format`` renders a retrieved history item in the prompt (LaMP's formats).
    - ``corpus_fields`` are the fields BM25 indexes; ``query_marker`` is the text after which a
      query input holds the part to retrieve with.
    """

    name: str
    kind: Kind
    input_field: str
    output_field: str | None
    instruction: str
    context_format: str
    corpus_fields: tuple[str, ...]
    query_marker: str
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 32
    history_instruction: str | None = None  # for items without an output field (LaMP-7)
    profile_subject: str = "items"  # what the history is, for the PAG profile prompt
    aliases: tuple[str, ...] = field(default=(), compare=False)

    # ------------------------------------------------------------------ prompts
    def format_input(self, text: str) -> str:
        """The task input for an item text, exactly as a query of this task reads."""
        return self.instruction.format(input=text, labels=", ".join(self.labels))

    def history_example(self, item: HistoryItem) -> tuple[str, str]:
        """(prompt instruction, target) for training on one history item."""
        if self.output_field is None:
            return self.history_instruction or "", item[self.input_field]
        return self.format_input(item[self.input_field]), str(item[self.output_field])

    def render_context(self, item: HistoryItem) -> str:
        """How one retrieved history item is shown in the ``### User History`` section."""
        return self.context_format.format(**item.fields)

    # ---------------------------------------------------------------- retrieval
    def corpus_text(self, item: HistoryItem) -> str:
        return " ".join(str(item.get(f, "")) for f in self.corpus_fields).strip()

    def retrieval_query(self, query_input: str) -> str:
        """The part of a query input to retrieve with (LaMP strips the instruction)."""
        if self.query_marker == '"':  # LaMP-1: the paper title between the first quotes
            match = re.search(r'"(.*?)"', query_input)
            return match.group(1) if match else query_input
        index = query_input.find(self.query_marker)
        return query_input[index + len(self.query_marker):] if index >= 0 else query_input


def _generation(name, input_field, output_field, instruction, context, corpus, marker, subject,
                aliases=(), history_instruction=None, max_new_tokens=32) -> TaskSpec:
    return TaskSpec(name=name, kind="generation", input_field=input_field,
                    output_field=output_field, instruction=instruction, context_format=context,
                    corpus_fields=corpus, query_marker=marker, max_new_tokens=max_new_tokens,
                    history_instruction=history_instruction, profile_subject=subject,
                    aliases=aliases)


LAMP_1 = TaskSpec(
    name="LaMP-1", kind="classification", input_field="abstract", output_field="title",
    # LaMP-1 profile items are papers, not citation choices: train on abstract -> title.
    instruction="Generate a title for the following abstract of a paper: {input}",
    context_format='"{title}"', corpus_fields=("title", "abstract"), query_marker='"',
    labels=("[1]", "[2]"), max_new_tokens=4, profile_subject="paper titles and abstracts",
    aliases=("lamp1", "lamp-1", "lamp_1"),
)
LAMP_2_MOVIE = TaskSpec(
    name="LaMP-2", kind="classification", input_field="description", output_field="tag",
    instruction="Which tag does this movie relate to among the following tags? Just answer "
                "with the tag name without further explanation. tags: [{labels}] description: {input}",
    context_format='the tag for the movie: "{description}" is "{tag}"',
    corpus_fields=("description",), query_marker="description: ", labels=LAMP2_MOVIE_TAGS,
    max_new_tokens=8, profile_subject="movie descriptions and tags",
    aliases=("lamp2", "lamp-2", "lamp_2", "lamp-2m", "lamp2m"),
)
LAMP_2_NEWS = TaskSpec(
    name="LaMP-2N", kind="classification", input_field="text", output_field="category",
    instruction="Which category does this article relate to among the following categories? "
                "Just answer with the category name without further explanation. "
                "categories: [{labels}] article: {input}",
    context_format='the category for the article: "{text}" is "{category}"',
    corpus_fields=("text",), query_marker="article: ", labels=LAMP2_NEWS_CATEGORIES,
    max_new_tokens=8, profile_subject="news articles and their categories",
    aliases=("lamp2n", "lamp-2n", "lamp_2n"),
)
LAMP_3 = TaskSpec(
    name="LaMP-3", kind="rating", input_field="text", output_field="score",
    instruction="What is the score of the following review on a scale of 1 to 5? just answer "
                "with 1, 2, 3, 4, or 5 without further explanation. review: {input}",
    context_format='{score} is the score for "{text}"', corpus_fields=("text",),
    query_marker="review: ", labels=RATING_LABELS, max_new_tokens=3,
    profile_subject="product reviews and their scores", aliases=("lamp3", "lamp-3", "lamp_3"),
)
LAMP_4 = _generation(
    "LaMP-4", "text", "title", "Generate a headline for the following article: {input}",
    '"{title}" is the title for "{text}"', ("title", "text"), "article: ",
    "news articles and their headlines", aliases=("lamp4", "lamp-4", "lamp_4"),
)
LAMP_5 = _generation(
    "LaMP-5", "abstract", "title", "Generate a title for the following abstract of a paper: {input}",
    '"{title}" is the title for "{abstract}"', ("title", "abstract"), "paper: ",
    "paper abstracts and their titles", aliases=("lamp5", "lamp-5", "lamp_5"),
)
LAMP_6 = _generation(
    "LaMP-6", "text", "title", "Generate a subject for the following email: {input}",
    '"{title}" is the subject for "{text}"', ("title", "text"), "email: ",
    "emails and their subjects", aliases=("lamp6", "lamp-6", "lamp_6"),
)
LAMP_7 = _generation(
    "LaMP-7", "text", None,
    "Paraphrase the following tweet without any explanation before or after it: {input}",
    '"{text}"', ("text",), "it: ", "tweets", aliases=("lamp7", "lamp-7", "lamp_7"),
    history_instruction="Write a tweet in your own words:", max_new_tokens=48,
)

NEWS_HEADLINE = _generation(
    "news-headline", "text", "title", "Generate a headline for the following article: {input}",
    '"{title}" is the title for "{text}"', ("title", "text"), "article: ",
    "news articles and their headlines",
)


def news_category(labels: tuple[str, ...]) -> TaskSpec:
    """LaMP-2N style categorization over a fixed label list (given by the data's categories)."""
    return TaskSpec(
        name="news-category", kind="classification", input_field="text",
        output_field="category", instruction=LAMP_2_NEWS.instruction,
        context_format=LAMP_2_NEWS.context_format, corpus_fields=("text",),
        query_marker="article: ", labels=labels, max_new_tokens=8,
        profile_subject="news articles and their categories",
    )


SYNTHETIC = TaskSpec(
    name="synthetic", kind="rating", input_field="text", output_field="score",
    instruction="How would you rate the following item on a scale of 1 to 5? Just answer with "
                "1, 2, 3, 4, or 5 without further explanation. item: {input}",
    context_format='{score} is the score for "{text}"', corpus_fields=("text",),
    query_marker="item: ", labels=RATING_LABELS, max_new_tokens=3,
    profile_subject="items and the ratings the user gave them",
)

LAMP_TASKS = (LAMP_1, LAMP_2_MOVIE, LAMP_2_NEWS, LAMP_3, LAMP_4, LAMP_5, LAMP_6, LAMP_7)
#: Names accepted wherever a task is asked for (``news-category`` takes its labels from data).
TASK_NAMES = tuple(t.name for t in LAMP_TASKS) + ("news-headline", "news-category", "synthetic")


def lamp_task(name: str) -> TaskSpec:
    """The LaMP task spec for ``LaMP-4``, ``lamp4``, ``LaMP_4``... (case-insensitive)."""
    key = name.strip().lower()
    for task in LAMP_TASKS:
        if key == task.name.lower() or key in task.aliases:
            return task
    raise PflError(f"unknown LaMP task {name!r}; known: {', '.join(t.name for t in LAMP_TASKS)}")


def canonical_task_name(name: str) -> str:
    """A task's canonical name as given anywhere (``lamp4`` -> ``LaMP-4``; HuffPost tasks and
    ``synthetic`` as they are); an unknown name comes back lower-cased."""
    key = name.strip().lower()
    if key in ("synthetic", "news-headline", "news-category"):
        return key
    try:
        return lamp_task(name).name
    except PflError:
        return key
