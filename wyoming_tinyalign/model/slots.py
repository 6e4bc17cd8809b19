"""Intent slots that name things name what the household has, or what was said.

A small LLM misspells names it has never seen ("aquarium pump" -> "auplight"), and Home Assistant can do
nothing with a name it does not know; worse, it may name another of the household's things. While the
LLM writes the intent line, `SlotValues` keeps the value of a `name=` slot to the household's device
names and of an `area=` slot to its area names (both from the prompt's context) as `slot_values` allows
them: a name said in the transcript, when one is; else the one name that shares a word with it, and
runs of words of the transcript (a device the capped context leaves out can still be named as it was
heard, and a thing the household does not have is not swapped for one it has). Other slots are left as
the LLM writes them.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .prompt import context_names

SLOT_NAMES = {"name": "devices", "area": "areas"}  # slot -> the context's list of names for it
# Words that do not begin or end a name of a thing (English, as the dev model's commands are).
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "my", "our", "your", "his", "her", "their", "its",
    "it", "is", "are", "be", "was", "of", "in", "on", "off", "at", "to", "into", "from", "for", "with",
    "by", "and", "or", "but", "if", "please", "up", "down",
})  # fmt: skip


def said(transcript: str, names: list[str]) -> list[str]:
    """The `names` said in `transcript` (as whole words), but for those inside a longer one said ("lamp"
    in "turn on the bedside lamp")."""
    padded = f" {' '.join(transcript.split())} "
    named = [name for name in names if f" {name} " in padded]
    return [n for n in named if not any(n != other and f" {n} " in f" {other} " for other in named)]


def heard(transcript: str, names: list[str]) -> list[str]:
    """The runs of consecutive words of `transcript` that may name a thing none of `names` is: all but
    those that begin or end with a function word ("on", "the garden hose") and those that begin one of
    `names` ("aquarium" for the aquarium pump)."""
    words = transcript.split()
    runs = [
        " ".join(words[i:j])
        for i in range(len(words))
        if words[i] not in FUNCTION_WORDS
        for j in range(i + 1, len(words) + 1)
        if words[j - 1] not in FUNCTION_WORDS
    ]
    return [run for run in runs if not any(name.startswith(run + " ") for name in names)]


def slot_values(names: list[str], transcript: str) -> list[str]:
    """What a slot naming one of `names` may be after `transcript`: the names said in it, when one is
    ("the conservatory" is not the study); else the one name that shares a word with it ("wall sconce"
    for a misheard "wood sconce"; no guess between the heat pump and the aquarium pump for "the pump"),
    and the runs of words `heard`."""
    named = said(transcript, names)
    if named:
        return named
    words = set(transcript.split()) - FUNCTION_WORDS
    near = [name for name in names if words & set(name.split())]
    return (near if len(near) == 1 else []) + heard(transcript, names)


class SlotValues(LogitsProcessor):
    """For greedy decoding of one answer: the best-scored token that keeps the open `name=` / `area=`
    value a prefix of an allowed value (or ends it on one) wins. `transcript` is None when the answer
    starts with the transcript line (its words are allowed once it is written), else the given one.
    Scores may be wider than the tokenizer (an LLM's vocabulary is often padded): those ids lose."""

    def __init__(self, token_texts: list[str], eos_id: int, context: str, transcript: str | None) -> None:
        self.token_texts, self.eos_id, self.transcript = token_texts, eos_id, transcript
        names = context_names(context)
        self.names = {slot: names.get(label, []) for slot, label in SLOT_NAMES.items()}
        self._allowed: dict[tuple[str, str], list[str]] = {}  # (slot, transcript) -> its values

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = len(self.token_texts)
        answer = "".join(self.token_texts[i] for i in input_ids[0].tolist() if i < n)
        transcript, line = self.transcript, answer
        if transcript is None:
            transcript, newline, line = answer.partition("\n")
            if not newline:
                return scores
        if "\n" in line or "|" not in line:
            return scores
        slot, equals, value = line.rpartition("|")[2].partition("=")
        if not equals or not self.names.get(slot.strip()):
            return scores
        allowed = self.allowed(slot.strip(), transcript)
        if not _fits(value, allowed):
            return scores  # already off every allowed value (no token could keep it on one)
        order = scores[0, :n].argsort(descending=True).tolist()
        for rank, token in enumerate(order):
            ended = token == self.eos_id
            if _fits(value if ended else value + self.token_texts[token], allowed, ended):
                scores[0, order[:rank]] = -float("inf")
                scores[0, n:] = -float("inf")
                break
        return scores

    def allowed(self, slot: str, transcript: str) -> list[str]:
        """The values `slot` may take after `transcript` (worked out once per answer)."""
        key = (slot, transcript)
        if key not in self._allowed:
            self._allowed[key] = slot_values(self.names[slot], transcript)
        return self._allowed[key]


def _fits(value: str, allowed: list[str], ended: bool = False) -> bool:
    """Whether a slot value written so far can still be (or, when it has ended, is) an allowed one."""
    head, sep, _ = value.replace("\n", "|").partition("|")
    head = head.lstrip()
    if ended or sep:
        return head.rstrip() in allowed
    return any(a.startswith(head) for a in allowed) or (head.endswith(" ") and head.rstrip() in allowed)
