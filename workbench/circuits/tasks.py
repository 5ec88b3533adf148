"""Built-in contrastive tasks that the default code models solve.

Each task is a template whose slots take identifiers of the model's own vocabulary (learned
from the standard library's source), rendered twice: a clean prompt and a patch prompt that
differ in one token and call for different next tokens. Every prompt of a task tokenizes to
the same length (prompts that do not are skipped), so features can be compared position by
position and a circuit can be kept per position. Half of the pairs swap the roles of the
two variants, so a model that always prefers one answer scores 50%, not 100%.

- ``brackets``: ``    total = compute(value`` → ``)``; an index ``compute[value`` → ``]``.
- ``quotes``:   ``    label = 'value`` → ``'``; opened with ``"`` → ``"``.

(Copying an identifier seen earlier, e.g. ``self.name = name`` / ``return self.`` → ``name``,
was tried as a third task; the 4-layer default models get it right on only ~60% of
prompts, so it is not built in.)
"""

from __future__ import annotations

import keyword
import random
from dataclasses import dataclass

import torch

from .pairs import ContrastivePairs


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str  # str.format slots: identifiers, and {a} for the varied token
    variants: tuple[str, str]  # the two values of the varied slot {a}
    answers: tuple[str, str]  # the next token each variant calls for
    slots: tuple[str, ...]  # the identifier slots, filled at random (distinct within a prompt)


TASKS = {
    "brackets": Task("brackets", "close the bracket that is open: ')' after a call's '(', ']' after an index's '['",
                     "    {v} = {f}{a}{x}", ("(", "["), (")", "]"), ("v", "f", "x")),
    "quotes": Task("quotes", "close a string with the quote character that opened it",
                   "    {v} ={a}{x}", (" '", ' "'), ("'", '"'), ("v", "x")),
}


def list_tasks() -> dict[str, str]:
    """Built-in task names and what each asks of the model."""
    return {name: task.description for name, task in TASKS.items()}


def identifier_pool(tokenizer) -> list[str]:
    """Lower-case identifiers (3–10 letters, not keywords) that are single tokens both bare
    and after a space, so a slot costs one token wherever it sits."""
    vocab = tokenizer.get_vocab()
    pool = []
    for word in sorted(vocab):
        if word.isidentifier() and word.islower() and word.isascii() and 3 <= len(word) <= 10 \
                and not keyword.iskeyword(word) and _single(tokenizer, word) and _single(tokenizer, " " + word):
            pool.append(word)
    return pool


def _single(tokenizer, text: str) -> bool:
    return len(tokenizer.encode(text, add_special_tokens=False)) == 1


def task_pairs(name: str, model, n: int = 128, seed: int = 0) -> ContrastivePairs:
    """``n`` contrastive pairs of the built-in task ``name`` for ``model``'s tokenizer
    (a BOS token first when the model prepends one)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in tasks are {sorted(TASKS)} (or build your own "
                         "ContrastivePairs from token ids)")
    if n < 1:
        raise ValueError(f"n (pairs) must be >= 1, got {n}")
    task, tokenizer = TASKS[name], model.tokenizer
    pool = identifier_pool(tokenizer)
    if len(pool) < 2 * len(task.slots):
        raise ValueError(f"the tokenizer has only {len(pool)} single-token identifiers; task {name!r} needs more")
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
    by_length: dict[int, list] = {}  # rendered pairs by token length: the most common length wins
    seen = set()
    for attempt in range(50 * n):
        if by_length and max(len(group) for group in by_length.values()) == n:
            break
        words = dict(zip(task.slots, rng.sample(pool, len(task.slots))))
        order = (0, 1) if attempt % 2 == 0 else (1, 0)
        variants, answers = [task.variants[i] for i in order], [task.answers[i] for i in order]
        clean_text, patch_text = (task.template.format(a=a, **words) for a in variants)
        if (clean_text, patch_text) in seen:
            continue
        seen.add((clean_text, patch_text))
        clean, patch = (bos + tokenizer.encode(t, add_special_tokens=False) for t in (clean_text, patch_text))
        answer_ids = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
        if len(clean) != len(patch) or any(len(ids) != 1 for ids in answer_ids):
            continue
        by_length.setdefault(len(clean), []).append((clean, patch, answer_ids[0][0], answer_ids[1][0],
                                                     (clean_text, patch_text)))
    rows = max(by_length.values(), key=len, default=[])
    if len(rows) < n:
        raise ValueError(f"could render only {len(rows)} of {n} pairs of task {name!r} at one token length with "
                         "this tokenizer; ask for fewer")
    texts = [row[4] for row in rows]
    clean, patch, clean_answer, patch_answer = (torch.tensor(column) for column in list(zip(*rows))[:4])
    return ContrastivePairs(clean, patch, clean_answer, patch_answer, name=name, description=task.description,
                            texts=texts)
