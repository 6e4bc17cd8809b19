"""Instruction injection: the text prompt the projected audio tokens are placed in.

A template has two slots: `{context}` (household context: area and device names, in the one format that
`context_text` writes and `context_names` reads) and `{audio}` (where the projector's outputs, or a
text's token embeddings, go). The LLM answers with the transcript on one line and the intent on the next
(see `intents.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..intents import Intent, format_answer

DEFAULT_TEMPLATE = "home: {context}\nheard: {audio}\nanswer:\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt with an `{audio}` slot and a `{context}` slot."""

    text: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if self.text.count("{audio}") != 1 or self.text.count("{context}") != 1:
            raise ValueError("a prompt template needs exactly one {audio} and one {context} slot")

    def split(self, context: str) -> tuple[str, str]:
        """The text before and after the audio slot, with the household context filled in."""
        before, after = self.text.split("{audio}")
        return before.replace("{context}", context), after.replace("{context}", context)


def context_text(areas: Iterable[str], devices: Iterable[str]) -> str:
    """A household context as the prompt carries it: ``areas: a, b; devices: x, y`` (sorted, no repeats)."""
    return f"areas: {', '.join(sorted(set(areas)))}; devices: {', '.join(sorted(set(devices)))}"


def context_names(context: str) -> dict[str, list[str]]:
    """The lists of a household context (``areas: a, b; devices: x, y``) by label."""
    names: dict[str, list[str]] = {}
    for part in context.split(";"):
        label, sep, values = part.partition(":")
        if sep:
            names[label.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return names


def answer_ids(tokenizer, transcript: str, intent: Intent | None, transcript_only: bool = False) -> list[int]:
    """Token ids of the LLM's answer, ending in EOS; with `transcript_only`, the transcript line alone
    (a label whose intent is unknown: what follows the line is not taught).

    The transcript line (with its newline) is tokenized on its own, so that the text path can hand it
    to the LLM and let it write only the intent line.
    """
    line1, _, line2 = format_answer(transcript, intent).partition("\n")
    ids = tokenizer(line1 + "\n", add_special_tokens=False)["input_ids"]
    if transcript_only:
        return ids
    return ids + tokenizer(line2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
