"""Instruction injection: the text prompt the projected audio tokens are placed in.

A template has two slots: `{context}` (household context: entity, area and device names) and `{audio}`
(where the projector's outputs, or a text's token embeddings, go). The LLM answers with the transcript
on one line and the intent on the next (see `intents.py`).
"""

from __future__ import annotations

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


def answer_ids(tokenizer, transcript: str, intent: Intent | None) -> list[int]:
    """Token ids of the LLM's answer, ending in EOS.

    The transcript line (with its newline) is tokenized on its own, so that the text path can hand it
    to the LLM and let it write only the intent line.
    """
    line1, _, line2 = format_answer(transcript, intent).partition("\n")
    ids = tokenizer(line1 + "\n", add_special_tokens=False)["input_ids"]
    return ids + tokenizer(line2, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
