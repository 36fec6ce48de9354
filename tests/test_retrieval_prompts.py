"""BM25 retrieval (no leakage from later items) and the prompt template."""

import pytest

from shared.prompts import build_prompt, encode_example, encode_prompt, profile_prompt
from shared.retrieval import BM25Retriever, random_k, tokenize
from shared.tasks import LAMP_1, LAMP_2_MOVIE, LAMP_3, LAMP_4, LAMP_7, NEWS_HEADLINE
from shared.training import history_examples
from shared.types import HistoryItem


def item(i, text, title="t"):
    return HistoryItem(id=str(i), fields={"text": text, "title": title})


HISTORY = [
    item(0, "the senate passed the budget bill", "Budget passes"),
    item(1, "a recipe for sourdough bread at home", "Bake bread"),
    item(2, "the senate votes on a new budget", "Senate vote"),
    item(3, "hiking trails in the alps", "Alps hikes"),
]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("The Senate, votes!") == ["the", "senate", "votes"]


def test_top_k_ranks_relevant_items_first():
    retriever = BM25Retriever(NEWS_HEADLINE, HISTORY)
    top = retriever.top_k("sourdough bread recipe", 2)
    assert top[0].id == "1"
    # "senate" and "budget" are each in half of the items: classic Okapi idf would be 0 here
    assert {i.id for i in retriever.top_k("senate budget", 2)} == {"0", "2"}
    assert all(score > 0 for score in retriever.scores("senate")[[0, 2]])


def test_before_bound_never_returns_later_items():
    retriever = BM25Retriever(NEWS_HEADLINE, HISTORY)
    for before in range(len(HISTORY) + 1):
        got = retriever.top_k("senate budget bread alps", 10, before=before)
        assert all(int(i.id) < before for i in got)
        assert len(got) == before


def test_prefix_statistics_do_not_depend_on_later_items():
    """Scores over items 0..i-1 are the same whatever comes after them (idf too)."""
    short = BM25Retriever(NEWS_HEADLINE, HISTORY[:2])
    long = BM25Retriever(NEWS_HEADLINE, HISTORY + [item(9, "senate senate senate")])
    assert list(short.scores("senate bread")) == pytest.approx(list(long.scores("senate bread", 2)))


def test_k_zero_and_empty_history():
    assert BM25Retriever(NEWS_HEADLINE, HISTORY).top_k("senate", 0) == []
    assert BM25Retriever(NEWS_HEADLINE, []).top_k("senate", 3) == []


def test_random_k_is_reproducible_and_bounded():
    assert random_k(HISTORY, 2, "s") == random_k(HISTORY, 2, "s")
    assert len(random_k(HISTORY, 10, "s")) == len(HISTORY)


def test_training_examples_with_rag_only_see_earlier_items(tiny):
    examples = history_examples(NEWS_HEADLINE, HISTORY, tiny.tokenizer, rag_k=2)
    decoded = [tiny.tokenizer.decode(ids) for ids, _ in examples]
    assert "### User History" not in decoded[0]  # nothing before the first item
    assert "Budget passes" in decoded[1] and "Bake bread" not in decoded[1].split("Instruction")[0]
    for i, text in enumerate(decoded):
        context = text.split("### User Instruction")[0]
        for later in HISTORY[i:]:
            assert f'"{later["title"]}" is the title' not in context


def test_template_sections_and_omission():
    bare = build_prompt("Do it.")
    assert bare == "Do it."
    full = build_prompt("Do it.", profile="Likes cats.", retrieved=HISTORY[:1], task=NEWS_HEADLINE)
    assert full == ('### User Profile:\nLikes cats.\n\n### User History:\n'
                    '"Budget passes" is the title for "the senate passed the budget bill"'
                    '\n\n### User Instruction:\nDo it.')
    only_history = build_prompt("Do it.", retrieved=HISTORY[:1], task=NEWS_HEADLINE)
    assert "Profile" not in only_history and only_history.endswith("### User Instruction:\nDo it.")


def test_task_inputs_match_lamp_strings():
    assert LAMP_4.format_input("X") == "Generate a headline for the following article: X"
    assert LAMP_2_MOVIE.format_input("D").startswith(
        "Which tag does this movie relate to among the following tags? Just answer with the "
        "tag name without further explanation. tags: [sci-fi, based on a book, comedy,")
    assert LAMP_3.retrieval_query(LAMP_3.format_input("great phone")) == "great phone"
    assert LAMP_4.retrieval_query(LAMP_4.format_input("an article")) == "an article"
    q1 = ('For an author who has written the paper with the title "Deep Nets", which reference '
          'is related? Just answer with [1] or [2] without explanation. [1]: "A" [2]: "B"')
    assert LAMP_1.retrieval_query(q1) == "Deep Nets"


def test_history_example_uses_task_format_or_text_target():
    prompt, target = NEWS_HEADLINE.history_example(HISTORY[0])
    assert prompt == NEWS_HEADLINE.format_input("the senate passed the budget bill")
    assert target == "Budget passes"
    prompt7, target7 = LAMP_7.history_example(HistoryItem("x", {"text": "my tweet"}))
    assert target7 == "my tweet" and prompt7


def test_encode_example_masks_prompt_and_appends_eos(tiny):
    tok = tiny.tokenizer
    ids, labels = encode_example(tok, "Say hi.", "hello there")
    prompt_ids = encode_prompt(tok, "Say hi.")
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt_ids):-1]) == "hello there"


def test_long_prompts_keep_their_end(tiny):
    ids = encode_prompt(tiny.tokenizer, "word " * 500 + "THE QUERY", max_prompt_tokens=32)
    assert len(ids) == 32
    assert ids == encode_prompt(tiny.tokenizer, "word " * 500 + "THE QUERY")[-32:]


def test_profile_prompt_shows_recent_history():
    text = profile_prompt(NEWS_HEADLINE, HISTORY)
    assert "news articles and their headlines" in text and "Alps hikes" in text
