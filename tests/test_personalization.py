"""Personalization happens: a user's personal training makes the model more *theirs*.

Training on user X's history must lower the loss on X's held-out items more than it lowers
another user Y's: a general shift (learning the task format) lowers both, a personal one
lowers X's more. Each check fails if the personal training were a no-op (both drops 0) or
learnt nothing user-specific. Tiny model, the method cores as pfl eval and devices run them.
"""

from __future__ import annotations

import pytest
import torch

from shared.methods import perfit
from shared.methods.base import PersonalState, PromptAugmentation, Runtime
from shared.methods.oppu import PersonalLoraNoStage1
from shared.methods.perfit import PersonalShift, perfit_config, perfit_stage1
from shared.tasks import NEWS_HEADLINE
from shared.training import collate, history_examples, target_loss
from shared.types import HistoryItem, User

NONE = PromptAugmentation()


def make_user(uid: str, topic: str, headline: str, n: int = 10) -> User:
    """A news-headline user whose headlines share a recognisable style (``headline`` is a
    format with {topic} and {i})."""
    return User(id=uid, history=tuple(
        HistoryItem(id=f"{uid}-{i}", fields={
            "text": f"Report {i} on {topic}: officials said the {topic} plan moves on in "
                    f"week {i}.",
            "title": headline.format(topic=topic, i=i)})
        for i in range(n)), queries=())


X = make_user("xena", "weather", "BREAKING: {topic} update number {i}")
Y = make_user("yuri", "football", "Wow! Amazing {topic} scenes as game {i} ends in style")
HELD_OUT = 3  # the last items of each user are never trained on


def split(user: User) -> tuple[User, tuple]:
    return User(user.id, user.history[:-HELD_OUT], ()), user.history[-HELD_OUT:]


def examples(tokenizer, items):
    return history_examples(NEWS_HEADLINE, items, tokenizer, max_prompt_tokens=64,
                            max_target_tokens=16)


def lora_loss(core, runtime, state: PersonalState, items) -> float:
    """Held-out loss under a personal LoRA state (payload None: none trained yet)."""
    with core.model_for(runtime, state) as model, torch.no_grad():
        batch = collate(examples(runtime.tokenizer, items), runtime.tokenizer.pad_token_id,
                        runtime.loaded.device)
        return target_loss(model, batch).item()


def perfit_loss(runtime, stage2, items) -> float:
    stage1, _ = perfit_stage1(runtime)
    return perfit.evaluate_loss(runtime.model, examples(runtime.tokenizer, items), stage1,
                                stage2, positions=perfit_config(runtime).positions,
                                pad_id=runtime.tokenizer.pad_token_id)


def drops(core, runtime, loss, untrained) -> tuple[float, float]:
    """(drop of X's held-out loss, drop of Y's) when X's personal state replaces the
    untrained one; ``loss(state, items)`` scores held-out items under a state."""
    train_x, held_x = split(X)
    _, held_y = split(Y)
    before = loss(untrained, held_x), loss(untrained, held_y)
    state = core.personalize(runtime, train_x, NONE, None)
    after = loss(state, held_x), loss(state, held_y)
    return before[0] - after[0], before[1] - after[1]


def runtime_for(tiny, **options) -> Runtime:
    collective = [make_user(f"c{i}", topic, "{topic}: the news of day {i}") for i, topic in
                  enumerate(("markets", "science", "travel"))]
    return Runtime(loaded=tiny, task=NEWS_HEADLINE, seed=0, progress=False,
                   options={"max_history": None, **options},
                   roles={"targets": [X], "sharers": [], "collective": collective})


def test_a_personal_lora_fits_its_user_more_than_another(tiny):
    runtime = runtime_for(tiny, oppu={"lr": 2e-2, "epochs": 8, "max_prompt_tokens": 64,
                                      "max_target_tokens": 16})
    core = PersonalLoraNoStage1()
    own, other = drops(core, runtime, lambda state, items: lora_loss(core, runtime, state, items),
                       PersonalState())
    # measured 0.28 against 0.05 (a random tiny model learns slowly)
    assert own > 0.15, (own, other)
    assert own > other + 0.15, (own, other)


def test_a_personal_perfit_shift_fits_its_user_more_than_another(tiny):
    runtime = runtime_for(tiny, stage1_epochs=1,
                          perfit={"epochs": 8, "lr": 5e-2, "personal_rank": 4})
    core = PersonalShift()
    core.prepare(runtime, None, NONE)
    _, shared_stage2 = perfit_stage1(runtime)
    own, other = drops(core, runtime,
                       lambda state, items: perfit_loss(runtime, state.payload, items),
                       PersonalState(payload=shared_stage2))
    # measured 0.20 against -0.01
    assert own > 0.1, (own, other)
    assert own > other + 0.1, (own, other)


def test_the_check_fails_for_a_no_op_personalization(tiny):
    """The same measurement on a personalization that trains nothing: no drop at all."""
    runtime = runtime_for(tiny, oppu={"lr": 0.0, "epochs": 1, "max_prompt_tokens": 64,
                                      "max_target_tokens": 16})
    core = PersonalLoraNoStage1()
    own, other = drops(core, runtime, lambda state, items: lora_loss(core, runtime, state, items),
                       PersonalState())
    assert own == pytest.approx(0, abs=1e-6) and other == pytest.approx(0, abs=1e-6)
