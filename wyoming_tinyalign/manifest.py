"""Speech manifests: one JSON line per utterance, audio paths relative to the manifest's folder.

``{"audio": "wavs/h1/00012.wav", "text": "...", "intent": {"name": ..., "slots": {...}},
"speaker": "...", "household": "..."}``; ``intent`` may be null (not a command). A label that gives
the words but not the intent (the nightly teacher's) says ``"transcript_only": true``: its intent is
unknown, so it is neither taught nor scored.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import AudioError, read_wav
from .files import write_atomic
from .intents import Intent

_LOG = logging.getLogger(__name__)


@dataclass
class Utterance:
    audio: Path
    text: str
    intent: Intent | None
    speaker: str
    household: str
    transcript_only: bool = False  # the intent is unknown (not "not a command"): train the words alone


def read_manifest(path: Path) -> list[Utterance]:
    """Read a manifest; audio paths are resolved against the manifest's folder."""
    base = path.parent
    utterances = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                intent = row.get("intent")
                utterances.append(
                    Utterance(
                        audio=base / row["audio"],
                        text=str(row["text"]),
                        intent=None if intent is None else Intent.from_json(intent),
                        speaker=str(row.get("speaker", "")),
                        household=str(row.get("household", "")),
                        transcript_only=bool(row.get("transcript_only", False)),
                    )
                )
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                raise ValueError(f"{path}:{number}: bad manifest line: {reason}") from err
    return utterances


def write_manifest(path: Path, utterances: list[Utterance]) -> None:
    """Write a manifest atomically; absolute audio paths are made relative to its folder."""
    lines = []
    for utt in utterances:
        audio = Path(os.path.relpath(utt.audio, path.parent)) if utt.audio.is_absolute() else utt.audio
        row = {
            "audio": audio.as_posix(),
            "text": utt.text,
            "intent": utt.intent.to_json() if utt.intent else None,
            "speaker": utt.speaker,
            "household": utt.household,
        }
        if utt.transcript_only:
            row["transcript_only"] = True
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomic(path, "".join(lines).encode("utf-8"))


def load_utterances(path: Path, log: logging.Logger = _LOG) -> list[tuple[Utterance, np.ndarray]]:
    """Read a manifest and its audio (float32 mono 16 kHz); unreadable audio is logged and skipped."""
    loaded = []
    for utt in read_manifest(path):
        try:
            loaded.append((utt, read_wav(utt.audio)))
        except AudioError as err:
            log.warning("Skipping utterance: %s", err)
    return loaded
