"""Intent slots that name things name what the household has, or what was said.

A small LLM misspells names it has never seen ("aquarium pump" -> "auplight"), and Home Assistant can do
nothing with a name it does not know. While the LLM writes the intent line, `SlotValues` keeps the value
of a `name=` slot to the household's device names and of an `area=` slot to its area names (both from
the prompt's context), or to words of the transcript: a device the context leaves out (the context is
capped) can still be named as it was heard, and a thing the household does not have is not swapped for
one it has. When the transcript says one of the names, the others are out; words that begin or overlap
one of the names do not make a name (`heard`). Other slots are left as the LLM writes them.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .prompt import context_names

SLOT_NAMES = {"name": "devices", "area": "areas"}  # slot -> the context's list of names for it


def said(transcript: str, names: list[str]) -> list[tuple[str, int, int]]:
    """Each of `names` said in `transcript`, with the words it spans there (start, end)."""
    words = transcript.split()
    return [
        (name, i, i + len(name.split()))
        for name in names
        for i in range(len(words))
        if words[i : i + len(name.split())] == name.split()
    ]


def heard(transcript: str, names: list[str]) -> list[str]:
    """The runs of consecutive words of `transcript` that may name a thing other than `names`: all but
    those that begin one of `names` ("aquarium" for the aquarium pump) and those that overlap one of
    `names` said in it ("rail is off", "the towel rail" in "check if the towel rail is off")."""
    words, spans = transcript.split(), [(a, b) for _, a, b in said(transcript, names)]
    runs = []
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            run = " ".join(words[i:j])
            if not any(n.startswith(run + " ") for n in names) and not any(i < b and a < j for a, b in spans):
                runs.append(run)
    return runs


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
            names = self.names[slot]
            # When one of the names was said, the others are out: "the conservatory" is not the study.
            named = [name for name, _, _ in said(transcript, names)]
            self._allowed[key] = (named or names) + heard(transcript, names)
        return self._allowed[key]


def _fits(value: str, allowed: list[str], ended: bool = False) -> bool:
    """Whether a slot value written so far can still be (or, when it has ended, is) an allowed one."""
    head, sep, _ = value.replace("\n", "|").partition("|")
    head = head.lstrip()
    if ended or sep:
        return head.rstrip() in allowed
    return any(a.startswith(head) for a in allowed) or (head.endswith(" ") and head.rstrip() in allowed)
