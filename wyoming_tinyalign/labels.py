"""Labels for logged utterances, strongest first, each with its source.

1. **correction**: a transcript and/or intent typed by the household through the review API
   (`PUT /api/interactions/{id}/correction`), stored as JSON in the `correction` column.
2. **teacher**: Whisper's own decoder run on the logged audio at night (the cascade path's transcript),
   kept only when its mean token log-probability is at least `teacher_min_confidence`.
3. **outcome**: the intent the server answered, confirmed by what happened next: Home Assistant did not
   report a failure (`ha_outcome`) and, from the same satellite/device (or client address), no request
   within `outcome_window_s` repeated the same intent or undid it (`HassTurnOn` <-> `HassTurnOff` on the
   same target). The label's text is then the transcript the server produced.

Each field takes the strongest source that has it: the text from a correction, else the teacher, else a
confirmed outcome; the intent from a correction, else a confirmed outcome (the teacher gives no intent).
A row without a text label is not used (EmbedLink learns the transcript). All functions take an open
`sqlite3.Connection` of the interaction log and are meant for one thread (the store's, or the job's).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from .intents import INTENT_SLOTS, Intent

SOURCES = ("correction", "teacher", "outcome")
FAILED_OUTCOMES = {"failed", "error", "not-executed", "not_executed", "repeated", "undone"}
UNDO = {"HassTurnOn": "HassTurnOff", "HassTurnOff": "HassTurnOn"}
TARGET_SLOTS = ("name", "area", "domain")
_UNSET = object()


@dataclass(frozen=True)
class LabelSettings:
    teacher_min_confidence: float = -0.5  # mean log-probability of Whisper's tokens
    outcome_window_s: float = 120.0


@dataclass(frozen=True)
class Label:
    """What a logged utterance should have been heard as, and where that came from."""

    id: int
    audio_path: str
    created_at: float
    text: str
    intent: Intent | None
    source: str  # the strongest source used: correction / teacher / outcome
    text_source: str
    intent_source: str | None
    language: str | None = None  # what the request said it was (Whisper's start tokens)

    @property
    def typed(self) -> bool:
        """The words are the household's own correction (not Whisper's, as the teacher's are)."""
        return self.text_source == "correction"


# ------------------------------------------------------------------------------------------ corrections
def validate_correction(body: Any) -> dict[str, Any]:
    """A correction from the API: `{"text": str, "intent": {"name": ..., "slots": {...}} | null}`, either
    field optional (`"intent": null` says "this was not a command"). Raises ValueError with the reason."""
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object with 'text' and/or 'intent'")
    unknown = set(body) - {"text", "intent"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "text" not in body and "intent" not in body:
        raise ValueError("give 'text', 'intent' or both")
    out: dict[str, Any] = {}
    if "text" in body:
        text = body["text"]
        if not isinstance(text, str) or not text.strip() or len(text) > 1000:
            raise ValueError("'text' must be a non-empty string (at most 1000 characters)")
        out["text"] = " ".join(text.strip().split())
    if "intent" in body:
        out["intent"] = None if body["intent"] is None else _valid_intent(body["intent"]).to_json()
    return out


def _valid_intent(data: Any) -> Intent:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("'intent' must be null or an object with a 'name' and optional 'slots'")
    name, slots = data["name"], data.get("slots") or {}
    if name not in INTENT_SLOTS:
        raise ValueError(f"unknown intent {name!r}; known: {', '.join(INTENT_SLOTS)}")
    if not isinstance(slots, dict):
        raise ValueError("'intent.slots' must be an object")
    for key, value in slots.items():
        if key not in INTENT_SLOTS[name]:
            raise ValueError(
                f"{name} has no slot {key!r}; it takes {', '.join(INTENT_SLOTS[name]) or 'none'}"
            )
        if isinstance(value, bool) or not isinstance(value, str | int | float) or not str(value).strip():
            raise ValueError(f"slot {key!r} must be a non-empty string or a number")
    return Intent.from_json({"name": name, "slots": {k: str(v).strip() for k, v in slots.items()}})


def set_correction(conn: sqlite3.Connection, row_id: int, correction: dict[str, Any] | None) -> bool:
    """Store (or with None, remove) a validated correction; False when there is no such interaction."""
    value = None if correction is None else json.dumps({**correction, "at": time.time()})
    source = "correction" if correction is not None else None
    cursor = conn.execute(
        "UPDATE interactions SET correction = ?, label_source = "
        "CASE WHEN ? IS NOT NULL THEN ? WHEN label_source = 'correction' THEN NULL ELSE label_source END "
        "WHERE id = ?",
        (value, source, source, row_id),
    )
    return cursor.rowcount > 0


def parse_correction(raw: str | None) -> dict[str, Any] | None:
    """The stored correction (fields 'text' and/or 'intent'), or None."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _rows(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row  # on this cursor only: the connection may be shared
    return cursor.execute(sql, args).fetchall()


# --------------------------------------------------------------------------------------------- teacher
def rows_needing_teacher(conn: sqlite3.Connection, limit: int) -> list[sqlite3.Row]:
    """Logged utterances with audio and no teacher transcript yet, whose text is not already corrected
    (newest first: they matter most)."""
    rows = _rows(
        conn,
        "SELECT id, audio_path, path, transcript, confidence, correction, language FROM interactions "
        "WHERE kind = 'audio' AND audio_path IS NOT NULL AND teacher_transcript IS NULL "
        "ORDER BY created_at DESC, id DESC",
    )
    out = []
    for row in rows:
        correction = parse_correction(row["correction"]) or {}
        if "text" not in correction:
            out.append(row)
        if len(out) >= limit:
            break
    return out


def set_teacher(conn: sqlite3.Connection, row_id: int, text: str, confidence: float) -> None:
    """Remember the teacher's transcript (also when it is below the threshold: it is not recomputed)."""
    conn.execute(
        "UPDATE interactions SET teacher_transcript = ?, teacher_confidence = ? WHERE id = ?",
        (text, confidence, row_id),
    )


# --------------------------------------------------------------------------------------------- outcome
def _group(row: sqlite3.Row) -> str:
    """Who asked: the satellite, else the device, else the client's address without its port."""
    if row["satellite_id"]:
        return f"satellite:{row['satellite_id']}"
    if row["device_id"]:
        return f"device:{row['device_id']}"
    client = row["client"] or ""
    host = client.rsplit(":", 1)[0] if client.count(":") == 1 else client
    return f"client:{host}"


def _intent(raw: str | None) -> Intent | None:
    if not raw:
        return None
    try:
        return Intent.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def undoes(first: Intent, later: Intent) -> bool:
    """`later` switches back what `first` switched (TurnOn <-> TurnOff on the same target)."""
    if UNDO.get(first.name) != later.name:
        return False
    pick = {k: " ".join(v.lower().split()) for k, v in first.slots.items() if k in TARGET_SLOTS}
    other = {k: " ".join(v.lower().split()) for k, v in later.slots.items() if k in TARGET_SLOTS}
    return pick == other


def outcome(intent: Intent | None, ha_outcome: str | None, later: list[Intent | None], settled: bool) -> str:
    """`confirmed`, or why not: `none` (nothing recognized), `failed` (Home Assistant said so),
    `repeated`, `undone`, `pending` (the window is not over yet). `later`: the intents of the same
    asker's requests within the window."""
    if intent is None:
        return "none"
    if ha_outcome and ha_outcome.strip().lower() in FAILED_OUTCOMES:
        return "failed"
    for other in later:
        if other is not None and intent.matches(other):
            return "repeated"
        if other is not None and undoes(intent, other):
            return "undone"
    return "confirmed" if settled else "pending"


# ---------------------------------------------------------------------------------------------- labels
def compute_labels(
    conn: sqlite3.Connection, settings: LabelSettings, now: float | None = None
) -> tuple[list[Label], dict[str, int]]:
    """The label of every logged utterance that has one, and counts of outcomes by kind."""
    now = time.time() if now is None else now
    rows = _rows(
        conn,
        "SELECT id, created_at, kind, client, satellite_id, device_id, audio_path, transcript, intent, "
        "correction, teacher_transcript, teacher_confidence, ha_outcome, language FROM interactions "
        "ORDER BY created_at, id",
    )
    by_group: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_group.setdefault(_group(row), []).append(i)
    position = {i: (key, n) for key, members in by_group.items() for n, i in enumerate(members)}
    window = settings.outcome_window_s
    labels: list[Label] = []
    counts: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["kind"] != "audio" or not row["audio_path"]:
            continue
        key, n = position[i]
        later = []
        for j in by_group[key][n + 1 :]:
            if rows[j]["created_at"] - row["created_at"] > window:
                break
            later.append(_intent(rows[j]["intent"]))
        served = _intent(row["intent"])
        verdict = outcome(served, row["ha_outcome"], later, now - row["created_at"] >= window)
        counts[f"outcome_{verdict}"] = counts.get(f"outcome_{verdict}", 0) + 1
        label = _label(row, served, verdict == "confirmed", settings)
        if label is not None:
            labels.append(label)
            counts[label.source] = counts.get(label.source, 0) + 1
    return labels, counts


def _label(row: sqlite3.Row, served: Intent | None, confirmed: bool, settings: LabelSettings) -> Label | None:
    correction = parse_correction(row["correction"]) or {}
    teacher = (row["teacher_transcript"] or "").strip()
    confidence = row["teacher_confidence"]
    teacher_ok = bool(teacher) and confidence is not None and confidence >= settings.teacher_min_confidence
    transcript = (row["transcript"] or "").strip()
    if correction.get("text"):
        text, text_source = str(correction["text"]), "correction"
    elif teacher_ok:
        text, text_source = teacher, "teacher"
    elif confirmed and transcript:
        text, text_source = transcript, "outcome"
    else:
        return None
    intent: Intent | None = None
    intent_source: str | None = None
    if "intent" in correction:
        intent, intent_source = _intent(json.dumps(correction["intent"])), "correction"
    elif confirmed:
        intent, intent_source = served, "outcome"
    strongest = min((text_source, intent_source or text_source), key=SOURCES.index)
    return Label(
        id=int(row["id"]),
        audio_path=str(row["audio_path"]),
        created_at=float(row["created_at"]),
        text=text,
        intent=intent,
        source=strongest,
        text_source=text_source,
        intent_source=intent_source,
        language=row["language"],
    )


def record_label_sources(conn: sqlite3.Connection, labels: list[Label], now: float | None = None) -> None:
    """Write each row's label source (what `GET /api/interactions?labelled=...` filters on)."""
    now = time.time() if now is None else now
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE interactions SET label_source = NULL WHERE correction IS NULL")
        conn.executemany(
            "UPDATE interactions SET label_source = ?, labelled_at = ? WHERE id = ?",
            [(label.source, now, label.id) for label in labels],
        )
