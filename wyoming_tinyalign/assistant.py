"""What the server does with a request, independent of the protocol: run the model, remember, log.

- Audio -> transcript and intent on the inference worker; the interaction is logged in the background
  (the answer never waits for the disk).
- Text -> intent. When the text is a transcript this server just produced from audio, the intent already
  computed from the audio is reused (no second LLM run) and the logged utterance is linked to the
  conversation that used it.
- Household context for instruction injection comes from a `ContextProvider` (a callable), so a later
  Home Assistant websocket client can feed exposed area and device names without touching this code.
- An intent heard with too little confidence is withheld (`unsure`): the answer says so ("not sure I
  heard that right") rather than act on the wrong device. The transcript is still given, and logged
  with the intent withheld, so the household page can offer it to be confirmed or corrected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audio import TARGET_RATE
from .intents import Intent
from .model.prompt import context_text
from .model.speechllm import Result
from .store import Interaction, InteractionStore
from .worker import InferenceWorker, PcmSegment

_LOGGER = logging.getLogger(__name__)

ContextProvider = Callable[[], str]
# Mean log-probability of the transcript's tokens under which an audio answer's intent is withheld.
# Chosen on the demo model (benchmarks/confidence.py); another model may want another value.
DEFAULT_MIN_CONFIDENCE = -0.15
RECENT_TTL_S = 120.0
RECENT_MAX = 32


@dataclass(frozen=True)
class Request:
    """Who asked, in which language, with which Wyoming context (conversation/satellite/device ids)."""

    client: str
    language: str
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Answer:
    """What a request is answered with: the transcript (a text request's own text), the intent to act
    on, and the intent heard but withheld as unsure (`intent` is then None)."""

    transcript: str
    intent: Intent | None
    withheld: Intent | None = None


@dataclass
class _Recent:
    answer: Answer
    row: asyncio.Task[int | None] | None
    at: float


def static_context(text: str = "") -> ContextProvider:
    """A provider that always gives the same household context."""
    return lambda: text


def load_context_file(path: Path) -> str:
    """Household context text (``areas: ...; devices: ...``) from a JSON file.

    Accepts one household in the `households.json` style, or just ``{"areas": [...], "devices": [...]}``
    where a device is a name or an object with a ``name``.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--context-file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"--context-file {path}: expected a JSON object with 'areas' and 'devices'")
    areas = data.get("areas") or []
    devices = [d.get("name") if isinstance(d, dict) else d for d in data.get("devices") or []]
    names = [*areas, *devices]
    if not isinstance(areas, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"--context-file {path}: 'areas' and device names must be non-empty strings")
    return context_text([a.strip().lower() for a in areas], [d.strip().lower() for d in devices])


def response_text(intent: Intent) -> str:
    """A short spoken confirmation of an intent, e.g. "Turning on the porch light."."""
    slots = intent.slots
    target = _target(slots)
    match intent.name:
        case "HassTurnOn" | "HassTurnOff":
            return f"Turning {'on' if intent.name == 'HassTurnOn' else 'off'} {target}."
        case "HassLightSet":
            level = f" to {slots['brightness']} percent" if "brightness" in slots else ""
            return f"Setting {target}{level}."
        case "HassClimateSetTemperature":
            where = f" in the {slots['area']}" if "area" in slots else ""
            return f"Setting the temperature{where} to {slots.get('temperature', '?')} degrees."
        case "HassGetState":
            return f"Checking {target}."
        case "HassStartTimer":
            units = [u for u in ("hours", "minutes", "seconds") if u in slots]
            parts = [f"{slots[u]} {u[:-1] if slots[u] == '1' else u}" for u in units]
            return f"Starting a timer for {' and '.join(parts)}." if parts else "Starting a timer."
        case "HassCancelAllTimers":
            return "Cancelling all timers."
    return "Done."


def unsure(result: Result, min_confidence: float | None) -> bool:
    """Whether the intent of an audio answer is to be withheld: the model heard the words with a mean
    token log-probability under `min_confidence` (None: never withheld). Answers without a confidence
    (the readout path, silence) are kept."""
    return (
        min_confidence is not None
        and result.intent is not None
        and result.confidence is not None
        and result.confidence < min_confidence
    )


def _target(slots: dict[str, str]) -> str:
    if "name" in slots:
        return f"the {slots['name']}"
    domain = f"the {slots['domain']}s" if "domain" in slots else "everything"
    return f"{domain} in the {slots['area']}" if "area" in slots else domain


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


class Assistant:
    """Runs requests on the shared worker, remembers recent transcripts, logs interactions."""

    def __init__(
        self,
        worker: InferenceWorker,
        store: InteractionStore | None,
        household: ContextProvider,
        projector_version: str | None,
        min_confidence: float | None = None,
    ) -> None:
        self.worker = worker
        self.store = store
        self.household = household
        self.projector_version = projector_version
        # The version whose Whisper decoder adapters serve the cascade (None: the decoder as built).
        self.cascade_version: str | None = None
        self.min_confidence = min_confidence
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._logging: set[asyncio.Task[int | None]] = set()
        # (kind, path, ms, answer) of each request, e.g. for metrics; answer: intent|withheld|none
        self.observers: list[Callable[[str, str, float, str], None]] = []

    async def transcribe(self, segments: list[PcmSegment], request: Request) -> Answer:
        """One utterance (raw PCM as it arrived) -> transcript and intent; logged in the background."""
        created, t0 = time.time(), time.perf_counter()
        audio, result = await self.worker.transcribe(segments, self.household(), request.language)
        latency_ms = (time.perf_counter() - t0) * 1000
        answer = Answer(result.transcript, result.intent)
        if unsure(result, self.min_confidence):
            assert result.intent is not None and result.confidence is not None
            _LOGGER.info(
                "%s: withholding %s: heard with confidence %.2f, under %.2f (--min-confidence)",
                request.client, result.intent.name, result.confidence, self.min_confidence,
            )  # fmt: skip
            answer = Answer(result.transcript, None, withheld=result.intent)
        self._observe("audio", result.path, latency_ms, _label(answer))
        # What was said (words, names) only with --debug: the add-on's log outlives a delete.
        outcome = answer.intent.name if answer.intent else "withheld" if answer.withheld else "not recognized"
        _LOGGER.info(
            "%s: %.1f s of audio -> %s (%s, %.0f ms)",
            request.client, audio.size / TARGET_RATE, outcome, result.path, latency_ms,
        )  # fmt: skip
        said = answer.intent or answer.withheld
        _LOGGER.debug(
            "%s: heard %r -> %s", request.client, result.transcript, said.to_text() if said else "nothing"
        )
        interaction = self._interaction(request, "audio", created)
        interaction.duration_s = audio.size / TARGET_RATE
        interaction.path = result.path
        interaction.transcript = result.transcript
        interaction.intent = answer.intent
        interaction.withheld = answer.withheld
        interaction.confidence = result.confidence
        interaction.latency_ms = latency_ms
        interaction.model_ms = result.latency_ms
        interaction.projector_version = (
            self.projector_version if result.path != "cascade" else self.cascade_version
        )
        row = self._log(interaction, audio)
        if result.transcript:
            self._remember(result.transcript, _Recent(answer, row, time.monotonic()))
        return answer

    async def understand(self, text: str, request: Request) -> Answer:
        """Text -> intent, reusing the answer to a transcript this server just produced from audio."""
        recent = self._recent.pop(_normalize(text), None)
        if recent is not None and time.monotonic() - recent.at <= RECENT_TTL_S:
            _LOGGER.debug("%s: reusing the intent computed from the audio of %r", request.client, text)
            self._observe("text", "reused", 0.0, _label(recent.answer))
            if recent.row is not None and request.context and self.store is not None:
                row_id = await recent.row
                if row_id is not None:
                    await self.store.async_link(row_id, request.context)
            return recent.answer
        created, t0 = time.time(), time.perf_counter()
        intent = await self.worker.understand(text, self.household())
        interaction = self._interaction(request, "text", created)
        interaction.path = "text"
        interaction.transcript = text
        interaction.intent = intent
        interaction.latency_ms = interaction.model_ms = (time.perf_counter() - t0) * 1000
        answer = Answer(text, intent)
        self._observe("text", "text", interaction.latency_ms, _label(answer))
        self._log(interaction, None)
        return answer

    def _observe(self, kind: str, path: str, latency_ms: float, answer: str) -> None:
        for observer in self.observers:
            try:
                observer(kind, path, latency_ms, answer)
            except Exception:  # metrics must never break answering
                _LOGGER.exception("request observer failed")

    async def drain(self) -> None:
        """Wait until every interaction handed to the log is written."""
        if self._logging:
            await asyncio.gather(*self._logging, return_exceptions=True)

    def _interaction(self, request: Request, kind: str, created: float) -> Interaction:
        ctx = request.context
        return Interaction(
            kind=kind,
            created_at=created,
            client=request.client,
            satellite_id=_opt_str(ctx.get("satellite_id")),
            device_id=_opt_str(ctx.get("device_id")),
            conversation_id=_opt_str(ctx.get("conversation_id")),
            context=ctx or None,
            language=request.language,
        )

    def _log(self, interaction: Interaction, audio: np.ndarray | None) -> asyncio.Task[int | None] | None:
        if self.store is None:
            return None
        task = asyncio.create_task(self._write(interaction, audio))
        self._logging.add(task)
        task.add_done_callback(self._logging.discard)
        return task

    async def _write(self, interaction: Interaction, audio: np.ndarray | None) -> int | None:
        assert self.store is not None
        try:
            return await self.store.async_add(interaction, audio)
        except Exception:  # a full disk must not break answering; the store has said why
            return None

    def _remember(self, transcript: str, entry: _Recent) -> None:
        key = _normalize(transcript)
        self._recent.pop(key, None)
        self._recent[key] = entry
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)


def _label(answer: Answer) -> str:
    """An answer's label for observers: "intent", "withheld" or "none"."""
    if answer.withheld is not None:
        return "withheld"
    return "none" if answer.intent is None else "intent"


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
