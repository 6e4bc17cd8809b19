"""Helpers for the adaptation tests: speech rendered once per session, a household's interaction log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from wyoming_tinyalign.adapt import GENERAL_SEED, REPLAY_SEED, bootstrap_speech
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.labels import set_correction, validate_correction
from wyoming_tinyalign.manifest import Utterance, load_utterances
from wyoming_tinyalign.store import Interaction, InteractionStore
from wyoming_tinyalign.synth import render_corpus
from wyoming_tinyalign.versions import record_model

REPLAY_N, GENERAL_N = 32, 16
UNSEEN = "highland"  # a household whose voices and devices the dev model never trained on


def _once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / name


def bootstrap_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base-household speech for replay and the general held-out set, rendered once per session in the
    layout the job uses (so the job finds it and renders nothing)."""
    folder = _once(tmp_path_factory, "bootstrap")
    base = [h for h in load_households() if h.split == "base"]
    for name, n, seed in (("replay", REPLAY_N, REPLAY_SEED), ("general", GENERAL_N, GENERAL_SEED)):
        bootstrap_speech(folder, name, n, seed, base)
    return folder


def unseen_speech(
    tmp_path_factory: pytest.TempPathFactory, n: int, seed: int
) -> list[tuple[Utterance, np.ndarray]]:
    """Utterances of the unseen household (rendered once per session for each n and seed)."""
    folder = _once(tmp_path_factory, f"unseen-{n}-{seed}")
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        render_corpus(folder, [h for h in load_households() if h.name == UNSEEN], n, seed)
    return load_utterances(manifest)


def job_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`adapt` flags for tests: the session's small replay and general sets, no teacher labels, and
    promotion decided on the held-out loss: the micro model's answers are noise for every projector
    (intent accuracy about 0, WER about 1 on 5-8 held-out utterances), its loss is not. Whisper's
    decoder adapters are not trained: the micro Whisper's are tested on their own (test_decoder_night)."""
    return [
        "--replay-n", str(REPLAY_N), "--general-n", str(GENERAL_N),
        "--bootstrap-dir", str(bootstrap_dir(tmp_path_factory)), "--teacher-min-confidence", "1",
        "--decide-on", "loss", "--decoder-epochs", "0",
    ]  # fmt: skip


def log_household(
    data_dir: Path, model: Path, utterances: list[tuple[Utterance, np.ndarray]], correct: bool = True
) -> list[int]:
    """A data dir as the server leaves it (model.json, the log with audio), with each utterance
    corrected to its true text and intent (as a family member would through the API)."""
    record_model(data_dir, model, "micro")
    store = InteractionStore(data_dir / "log")
    store.open()
    ids = []
    try:
        start = time.time() - 86400
        for i, (utt, audio) in enumerate(utterances):
            row = store.add(
                Interaction(
                    kind="audio", created_at=start + 600 * i, client=f"10.0.0.9:{40000 + i}", path="aligned",
                    transcript="something else", duration_s=audio.size / 16000, satellite_id="kitchen",
                ),
                audio,
            )  # fmt: skip
            if correct:
                body = {"text": utt.text, "intent": utt.intent.to_json() if utt.intent else None}
                set_correction(store.conn, row, validate_correction(body))
            ids.append(row)
    finally:
        store.close()
    return ids


def cli(
    *args: str, timeout: float = 600, preexec_fn: Callable[[], object] | None = None
) -> subprocess.CompletedProcess:
    """`wyoming-tinyalign ARGS` in a child process (`preexec_fn`: run in the child before it starts)."""
    return subprocess.run(
        [sys.executable, "-m", "wyoming_tinyalign", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ}, preexec_fn=preexec_fn,
    )  # fmt: skip


def last_json(stdout: str) -> dict:
    """The report: the last line of a command's standard output."""
    return json.loads(stdout.strip().splitlines()[-1])
