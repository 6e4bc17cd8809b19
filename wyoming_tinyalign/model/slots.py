"""The intent line the LLM writes: one `parse_intent` reads, naming what the household has or what was said.

A small LLM misspells names it has never seen ("aquarium pump" -> "auplight"), and Home Assistant can do
nothing with a name it does not know; worse, it may name another of the household's things, or write a
line no parser reads (a slot twice, or one its intent does not take). While the LLM writes the intent
line, `IntentGrammar` keeps it to the form `Intent.to_text` writes: a known intent (or "none"), then that
intent's slots, each at most once and in their fixed order. A number is one the transcript says (in
digits or English words; 0 to 100 when it says none), each said number to one slot; the value of a
`name=` slot is one of the household's device names and of an `area=` slot one of its area names (both
from the prompt's context), as `slot_values` allows them: a name said in the transcript, when one is;
else the one name that shares a word with it, and runs of words of the transcript after its verb (a
device the capped context leaves out can still be named as it was heard, and a thing the household does
not have is not swapped for one it has). A word goes to one name (no `area=band` after `name=band saw`),
and a device named takes no `domain=` ("the attic fan" is no light).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from ..intents import INTENT_SLOTS, NOT_RECOGNIZED, SEP
from .prompt import context_names

WALK = 256  # how far down the LLM's ranking a token that fits is looked for, before one character
SLOT_NAMES = {"name": "devices", "area": "areas"}  # slot -> the context's list of names for it
NUMBER_SLOTS = frozenset({"brightness", "temperature", "hours", "minutes", "seconds"})
# English number words, for transcripts that spell numbers out ("set a timer for five minutes").
_UNITS = {w: i for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
))}  # fmt: skip
_TENS = {w: 10 * i for i, w in enumerate((
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
), 2)}  # fmt: skip
ANY_NUMBER = [str(i) for i in range(101)]  # what a number slot may be when the transcript says none
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
    """The runs of consecutive words of `transcript` that may name a thing none of `names` is: all after
    its first word (a command's verb: "turn", "please switch"; "is" of a question) but those that begin
    or end with a function word ("on", "the garden hose") and those that begin one of `names`
    ("aquarium" for the aquarium pump)."""
    words = transcript.split()
    first = 1 if words[:1] != ["please"] else 2
    runs = [
        " ".join(words[i:j])
        for i in range(first, len(words))
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


@dataclass(frozen=True)
class TokenTexts:
    """What `IntentGrammar` reads an LLM's answers with, made once when the model loads: the text of each
    of the tokenizer's tokens, its EOS id, and the ids of its one-character tokens and EOS (what any line
    that fits can go on with)."""

    texts: list[str]
    eos_id: int
    chars: torch.Tensor

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> TokenTexts:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        eos = tokenizer.eos_token_id
        return cls(texts, eos, torch.tensor([i for i, t in enumerate(texts) if len(t) == 1] + [eos]))


class IntentGrammar(LogitsProcessor):
    """For greedy decoding of one answer: the best-scored token that keeps the intent line one that
    `line_fits` allows wins (of the `WALK` best, else of the one-character tokens). `transcript` is
    None when the answer starts with the transcript line (the intent line follows it), else the given
    one (the answer is the intent line). Scores may be wider than the tokenizer (an LLM's vocabulary is
    often padded): those ids lose."""

    def __init__(self, tokens: TokenTexts, context: str, transcript: str | None) -> None:
        self.tokens, self.transcript = tokens, transcript
        names = context_names(context)
        self.names = {slot: names.get(label, []) for slot, label in SLOT_NAMES.items()}
        self._values: dict[tuple[str, str], list[str] | None] = {}  # (slot, transcript) -> its values

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        texts = self.tokens.texts
        n = len(texts)
        line = "".join(texts[i] for i in input_ids[0].tolist() if i < n)
        transcript = self.transcript
        if transcript is None:
            transcript, newline, line = line.partition("\n")
            if not newline:
                return scores
        values = functools.partial(self.values, transcript=transcript)
        if "\n" in line or not line_fits(line, values):
            return scores  # the line has ended, or is off the grammar already (no token could mend it)
        best = int(scores[0].argmax())
        if best < n and self._fits_after(line, best, values):
            return scores
        ranked = scores[0, :n].topk(min(WALK, n)).indices.tolist()
        token = next((t for t in ranked if self._fits_after(line, t, values)), None)
        if token is None:  # far off the LLM's liking: on one character at a time
            chars = self.tokens.chars
            ranked = chars[scores[0, chars].argsort(descending=True)].tolist()
            token = next((t for t in ranked if self._fits_after(line, t, values)), None)
            if token is None:
                return scores  # the tokenizer cannot write what the line needs
        kept = scores[0, token].clone()
        scores.fill_(-float("inf"))
        scores[0, token] = kept
        return scores

    def values(self, slot: str, transcript: str) -> list[str] | None:
        """The values `slot` may take after `transcript` (worked out once per answer): a number slot the
        `numbers` said in it (when it says none, 0 to 100), a naming slot its `slot_values`; None: any (a
        slot of another kind, or one the context names nothing for)."""
        key = (slot, transcript)
        if key not in self._values:
            if slot in NUMBER_SLOTS:
                self._values[key] = numbers(transcript) or ANY_NUMBER
            else:
                names = self.names.get(slot)
                self._values[key] = slot_values(names, transcript) if names else None
        return self._values[key]

    def _fits_after(self, line: str, token: int, values: Callable[[str], list[str] | None]) -> bool:
        """Whether `line` followed by `token` still fits (a newline or EOS ends it)."""
        if token == self.tokens.eos_id:
            return line_fits(line, values, ended=True)
        head, newline, _ = (line + self.tokens.texts[token]).partition("\n")
        return line_fits(head, values, ended=bool(newline))


def line_fits(line: str, values: Callable[[str], list[str] | None], ended: bool = False) -> bool:
    """Whether an intent line written so far can still become (or, once it has `ended`, is) one in the
    form `Intent.to_text` writes: a known intent or "none", then ` | key=value` for the intent's slots
    in their fixed order, each at most once, with a value among `values(key)` (None: any). A number
    said goes to one slot ("2 hours and 4 minutes" is `hours=2 | minutes=4`, never `minutes=2` as
    well), a word to one name (after `name=band saw`, no `area=band`), and no `domain=` follows a
    `name=` (Home Assistant finds a device by its name; `name=attic fan | domain=light` is a light it
    cannot find)."""
    intent, space, rest = line.partition(" ")
    if not space:
        known = (*INTENT_SLOTS, NOT_RECOGNIZED)
        return intent in known if ended else any(k.startswith(intent) for k in known)
    written: dict[str, str] = {}  # the slots written so far, with their values

    def left(key: str) -> list[str] | None:
        """The values `key` may still take after the slots `written`."""
        if key == "domain" and "name" in written:
            return []
        allowed = values(key)
        if allowed is None or allowed is ANY_NUMBER or not written:  # (ANY_NUMBER: none said, any repeats)
            return allowed
        if key in NUMBER_SLOTS:
            return _without(allowed, [v for k, v in written.items() if k in NUMBER_SLOTS])
        if key in SLOT_NAMES:
            named = {word for k, v in written.items() if k in SLOT_NAMES for word in v.split()}
            return [value for value in allowed if named.isdisjoint(value.split())]
        return allowed

    keys = [k for k in INTENT_SLOTS.get(intent, ()) if left(k) != []]  # the slots it may still have
    opening = SEP.lstrip()  # what follows the intent's first space: "| "
    if not opening.startswith(rest[: len(opening)]):
        return False
    if len(rest) < len(opening):
        return bool(keys) and not ended
    slots = rest[len(opening) :].split(SEP)
    for slot in slots[:-1]:
        key, equals, value = slot.partition("=")
        if not equals or key not in keys or not _value_fits(value, left(key), whole=True):
            return False
        written[key] = value
        keys = [k for k in keys[keys.index(key) + 1 :] if left(k) != []]
    key, equals, value = slots[-1].partition("=")
    if not equals:  # the key is being written
        return not ended and any(k.startswith(key) for k in keys)
    if key not in keys:
        return False
    allowed, keys = left(key), keys[keys.index(key) + 1 :]
    if ended:
        return _value_fits(value, allowed, whole=True)
    if _value_fits(value, allowed, whole=False):
        return True
    # the whole value, then the start of the next slot's separator (" " or " |")
    head = value.removesuffix(SEP.rstrip()) if value.endswith("|") else value.removesuffix(" ")
    if value == head or not _value_fits(head, allowed, whole=True):
        return False
    written[key] = head
    return any(left(k) != [] for k in keys)


def numbers(transcript: str) -> list[str]:
    """The numbers said in `transcript`, in digits: those written in digits (as the dev model's Whisper
    writes them) and English number words up to a hundred ("five" -> "5", "twenty one" -> "21", "a
    hundred" -> "100")."""
    found: list[str] = []
    previous = ""
    for word in re.findall(r"\d+(?:\.\d+)?|[a-z]+", transcript.lower()):
        if word[0].isdigit():
            found.append(word)
        elif word in _UNITS and previous in _TENS and _UNITS[word] < 10:
            found[-1] = str(_TENS[previous] + _UNITS[word])
        elif word in _UNITS or word in _TENS:
            found.append(str(_UNITS.get(word, _TENS.get(word))))
        elif word == "hundred" and previous == "one":
            found[-1] = "100"
        elif word == "hundred" and previous == "a":
            found.append("100")
        previous = word
    return found


def _without(values: list[str], used: list[str]) -> list[str]:
    """`values` less one of each of `used` (a number said twice may go to two slots)."""
    rest = list(values)
    for value in used:
        if value in rest:
            rest.remove(value)
    return rest


def _value_fits(value: str, allowed: list[str] | None, whole: bool) -> bool:
    """Whether a slot value written so far can still be (or, when `whole`, is) one of `allowed` (None:
    any printable words, one space apart)."""
    written = value if whole else value + "x"  # a value being written may end in a space
    if "|" in value or not value.isprintable() or " ".join(written.split()) != written:
        return False
    if allowed is None:
        return bool(value) or not whole
    return value in allowed if whole else any(a.startswith(value) for a in allowed)
