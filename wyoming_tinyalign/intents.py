"""Home Assistant intents: the catalogue, and the one-line text form the LLM reads and writes.

The LLM answers with two lines: the transcript, then the intent in this form::

    turn on the porch light
    HassTurnOn | name=porch light

Slots are written in a fixed order so that every intent has exactly one text form.
An answer that does not parse into a known intent is "not recognized".
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Intent name -> the slot names it may carry (Home Assistant's own slot names).
INTENT_SLOTS: dict[str, tuple[str, ...]] = {
    "HassTurnOn": ("name", "area", "domain"),
    "HassTurnOff": ("name", "area", "domain"),
    "HassLightSet": ("name", "area", "brightness"),
    "HassClimateSetTemperature": ("area", "temperature"),
    "HassGetState": ("name", "area", "state"),
    "HassStartTimer": ("hours", "minutes", "seconds"),
    "HassCancelAllTimers": (),
}
NOT_RECOGNIZED = "none"
SEP = " | "  # between the intent and each slot


@dataclass(frozen=True)
class Intent:
    """An intent name with its slots (all slot values are strings)."""

    name: str
    slots: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """The canonical one-line form, e.g. ``HassTurnOn | name=porch light``."""
        order = INTENT_SLOTS.get(self.name, tuple(sorted(self.slots)))
        parts = [self.name] + [f"{k}={self.slots[k]}" for k in order if k in self.slots]
        return SEP.join(parts)

    def to_json(self) -> dict:
        return {"name": self.name, "slots": dict(self.slots)}

    @staticmethod
    def from_json(data: dict) -> Intent:
        return Intent(str(data["name"]), {str(k): str(v) for k, v in (data.get("slots") or {}).items()})

    def matches(self, other: Intent | None) -> bool:
        """Exact match of name and slots, case- and whitespace-insensitive."""
        return other is not None and _norm_intent(self) == _norm_intent(other)


def parse_intent(text: str) -> Intent | None:
    """Parse the one-line form; None when it is not a known intent with known slots."""
    parts = [p.strip() for p in text.strip().split("|")]
    name = parts[0]
    if name not in INTENT_SLOTS:
        return None
    slots: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in INTENT_SLOTS[name] or not value or key in slots:
            return None
        slots[key] = value
    return Intent(name, slots)


# What a path answers: the transcript, and the intent (None where it understood none).
Answer = tuple[str, Intent | None]


def format_answer(transcript: str, intent: Intent | None) -> str:
    """The LLM's target answer: transcript line, then intent line."""
    return f"{transcript}\n{intent.to_text() if intent else NOT_RECOGNIZED}"


def parse_answer(answer: str) -> Answer:
    """Split an LLM answer into (transcript, intent or None)."""
    transcript, _, rest = answer.strip().partition("\n")
    return transcript.strip(), parse_intent(rest.strip().split("\n")[0]) if rest else None


def _norm_intent(intent: Intent) -> tuple[str, tuple[tuple[str, str], ...]]:
    slots = tuple(sorted((k.lower(), " ".join(v.lower().split())) for k, v in intent.slots.items()))
    return intent.name.lower(), slots
