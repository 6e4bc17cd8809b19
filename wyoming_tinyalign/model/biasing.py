"""Contextual biasing: the cascade's Whisper leans toward the household's own names.

Whisper writes the names it has heard most ("garden", "living room") where a household says its own
("den", "sitting room"). The household's context (area and device names, as the prompt carries it)
comes with every request, so the cascade's greedy decoder adds a fixed bonus to the log-probability of
each token that continues a name it has begun or, outside one, starts one (shallow fusion over the names'
tokens, as "hotwords" in other ASR decoders). The bonus only tips close calls (within `NAME_BONUS` in
log-probability); the transcript's confidence stays Whisper's own score of what it wrote. Figures on
the demo model: `benchmarks/RESULTS.md`, "The cascade leans toward the household's names".
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from .prompt import context_names

# Log-probability added to a name's next token (chosen on the unseen households' labelled utterances,
# not their held-out ones; 4.0 writes names the audio does not support).
NAME_BONUS = 2.0


class NameBias:
    """The beginnings of a household's names (as token ids), and the bonus for going on with one."""

    def __init__(self, first: list[list[int]], later: list[list[int]], bonus: float = NAME_BONUS) -> None:
        """`first`: the names' token ids as a transcript may start with them (with or without a leading
        space); `later`: as they follow a word (after a space: a name run into the word before it, as in
        "theporch", is not one)."""
        self.bonus = bonus
        self.starts_first = {seq[0] for seq in first if seq}
        self.starts_later = {seq[0] for seq in later if seq}
        # Each proper beginning of a name (its first k tokens, k >= 1) -> the tokens that may follow it.
        self.following: dict[tuple[int, ...], set[int]] = {}
        names = {tuple(seq) for seq in [*first, *later]}  # (`from_context`'s `first` holds `later` too)
        for seq in names:
            for k in range(1, len(seq)):
                self.following.setdefault(seq[:k], set()).add(seq[k])
        self.longest = max(map(len, names), default=0)

    @classmethod
    def from_context(
        cls, tokenizer: PreTrainedTokenizerBase, context: str, bonus: float = NAME_BONUS
    ) -> NameBias | None:
        """The bias for `context`'s names (in lower case and capitalised); None when it names nothing."""
        names = {name for values in context_names(context).values() for name in values}
        spellings = sorted({s for name in names for s in (name, name[:1].upper() + name[1:])})
        if not spellings:
            return None

        def ids(texts: list[str]) -> list[list[int]]:
            return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

        later = ids([" " + s for s in spellings])
        return cls(ids(spellings) + later, later, bonus)

    def next_tokens(self, written: list[int]) -> set[int]:
        """The tokens that continue a name `written` ends partway through; where it ends in none, the
        tokens that start one (there: at the start of a transcript, or after a word)."""
        going_on: set[int] = set()
        for k in range(1, min(self.longest - 1, len(written)) + 1):
            going_on |= self.following.get(tuple(written[-k:]), set())
        return going_on or (self.starts_later if written else self.starts_first)

    def pick(self, logprobs: torch.Tensor, written: list[int]) -> int:
        """The token a greedy decoder writes after `written` with the bonus on `next_tokens(written)`:
        the likeliest of `logprobs` (one step's, over the vocabulary), unless one of those is within
        the bonus of it (without a biased copy of the vocabulary's log-probabilities)."""
        best = int(logprobs.argmax())
        names = torch.tensor(sorted(self.next_tokens(written)), device=logprobs.device)
        scores = logprobs[names]
        top = int(scores.argmax())
        return int(names[top]) if float(scores[top]) + self.bonus > float(logprobs[best]) else best
