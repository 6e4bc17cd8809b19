"""Labels from the interaction log: precedence (correction > teacher > confirmed outcome), the outcome
heuristic, corrections as the API takes them, and the schema migration that added the label source."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from serving import file_size_limit

from wyoming_tinyalign.intents import Intent
from wyoming_tinyalign.labels import (
    LabelSettings,
    compute_labels,
    outcome,
    record_label_sources,
    rows_needing_teacher,
    set_correction,
    set_teacher,
    validate_correction,
)
from wyoming_tinyalign.store import DB_FILE, MIGRATIONS, SCHEMA_VERSION, Interaction, InteractionStore

ON = Intent("HassTurnOn", {"name": "porch light"})
OFF = Intent("HassTurnOff", {"name": "porch light"})
T0 = 1_700_000_000.0
NOW = T0 + 86400
SETTINGS = LabelSettings(teacher_min_confidence=-0.5, outcome_window_s=120)


def add(store: InteractionStore, at: float, intent: Intent | None = ON, kind: str = "audio", **fields) -> int:
    audio = np.full(1600, 0.1, np.float32) if kind == "audio" else None
    base = {"client": "10.0.0.2:5000", "path": "aligned", "transcript": "turn on the porch light"}
    return store.add(Interaction(kind=kind, created_at=at, intent=intent, **(base | fields)), audio)


def labels_by_id(store: InteractionStore) -> dict[int, object]:
    labels, _ = compute_labels(store.conn, SETTINGS, now=NOW)
    return {label.id: label for label in labels}


def test_each_field_takes_its_strongest_source(store: InteractionStore) -> None:
    corrected = add(store, T0, language="de")  # asked in German: its label keeps it (Whisper's start)
    set_teacher(store.conn, corrected, "turn on the porch lamp", -0.1)
    set_correction(
        store.conn,
        corrected,
        validate_correction({"text": "turn on the porch light", "intent": ON.to_json()}),
    )
    teacher_and_outcome = add(store, T0 + 1000)
    set_teacher(store.conn, teacher_and_outcome, "turn on the porch lights", -0.2)
    weak_teacher = add(store, T0 + 2000)  # teacher below the threshold: the confirmed outcome labels it
    set_teacher(store.conn, weak_teacher, "turn on the torch light", -2.0)
    intent_only = add(store, T0 + 3000, intent=None)  # not recognized: only a corrected intent
    set_teacher(store.conn, intent_only, "switch the porch light on", -0.3)
    set_correction(store.conn, intent_only, validate_correction({"intent": ON.to_json()}))
    nothing = add(store, T0 + 4000, intent=None)  # no correction, no teacher, nothing confirmed
    no_text = add(store, T0 + 5000, intent=None)  # a corrected intent alone gives no text to learn
    set_correction(store.conn, no_text, validate_correction({"intent": OFF.to_json()}))

    got = labels_by_id(store)
    a = got[corrected]
    assert (a.text, a.intent, a.source, a.text_source, a.language) == (
        "turn on the porch light",
        ON,
        "correction",
        "correction",
        "de",
    )
    b = got[teacher_and_outcome]
    assert (b.text, b.intent, b.source) == ("turn on the porch lights", ON, "teacher")
    assert (b.text_source, b.intent_source) == ("teacher", "outcome")
    c = got[weak_teacher]
    assert (c.text, c.intent, c.source) == ("turn on the porch light", ON, "outcome")
    d = got[intent_only]
    assert (d.text, d.intent, d.source, d.text_source) == (
        "switch the porch light on",
        ON,
        "correction",
        "teacher",
    )
    assert nothing not in got and no_text not in got


def test_a_correction_can_say_it_was_not_a_command(store: InteractionStore) -> None:
    row = add(store, T0)
    set_correction(store.conn, row, validate_correction({"text": "what a lovely day", "intent": None}))
    label = labels_by_id(store)[row]
    assert (label.text, label.intent, label.source) == ("what a lovely day", None, "correction")


def test_repeats_and_undos_within_the_window_are_not_confirmed(store: InteractionStore) -> None:
    repeated = add(store, T0)
    add(store, T0 + 30, client="10.0.0.2:5001")  # same address, another port: the same asker repeats it
    undone = add(store, T0 + 1000, satellite_id="hall")
    add(store, T0 + 1060, intent=OFF, kind="text", satellite_id="hall")  # undone, even by text
    other_satellite = add(store, T0 + 2000, satellite_id="kitchen")
    add(store, T0 + 2010, intent=OFF, satellite_id="bedroom")  # someone else, elsewhere
    late_repeat = add(store, T0 + 3000, client="10.0.0.3:1")
    add(store, T0 + 3000 + 121, client="10.0.0.3:2")  # repeated after the window: it had worked
    failed = add(store, T0 + 4000, client="10.0.0.4:1")
    store.conn.execute("UPDATE interactions SET ha_outcome = 'failed' WHERE id = ?", (failed,))
    pending = add(store, NOW - 10, client="10.0.0.5:1")  # the window is not over yet

    got = labels_by_id(store)
    assert repeated not in got and undone not in got and failed not in got and pending not in got
    assert got[other_satellite].source == "outcome" and got[late_repeat].source == "outcome"
    _, counts = compute_labels(store.conn, SETTINGS, now=NOW)
    assert counts["outcome_repeated"] >= 1 and counts["outcome_undone"] == 1
    assert counts["outcome_failed"] == 1 and counts["outcome_pending"] == 1


def test_the_outcome_rule() -> None:
    assert outcome(None, None, [], True) == "none"
    assert outcome(ON, "executed", [], True) == "confirmed"
    assert outcome(ON, "error", [], True) == "failed"
    assert outcome(ON, None, [Intent("HassTurnOn", {"name": "Porch  Light"})], True) == "repeated"
    assert outcome(ON, None, [OFF], True) == "undone"
    assert outcome(ON, None, [Intent("HassTurnOff", {"name": "desk lamp"})], True) == "confirmed"
    assert outcome(ON, None, [None], False) == "pending"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "give 'text', 'intent' or both"),
        ({"text": ""}, "non-empty"),
        ({"text": 3}, "non-empty"),
        ({"txt": "hi"}, "unknown field"),
        ({"intent": {"name": "HassFly"}}, "unknown intent"),
        ({"intent": {"name": "HassTurnOn", "slots": {"colour": "red"}}}, "no slot 'colour'"),
        ({"intent": {"name": "HassLightSet", "slots": {"brightness": True}}}, "non-empty string or a number"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_corrections_are_refused_with_the_reason(body: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        validate_correction(body)


def test_corrections_are_normalised_and_can_be_removed(store: InteractionStore) -> None:
    row = add(store, T0)
    body = {
        "text": "  Set the desk lamp  to 50 ",
        "intent": {"name": "HassLightSet", "slots": {"brightness": 50}},
    }
    correction = validate_correction(body)
    assert correction == {
        "text": "Set the desk lamp to 50",
        "intent": {"name": "HassLightSet", "slots": {"brightness": "50"}},
    }
    assert set_correction(store.conn, row, correction)
    assert (
        store.conn.execute("SELECT label_source FROM interactions WHERE id = ?", (row,)).fetchone()[0]
        == "correction"
    )
    assert not set_correction(store.conn, row + 100, correction)  # no such row
    set_correction(store.conn, row, None)
    assert store.conn.execute("SELECT correction, label_source FROM interactions").fetchone() == (None, None)


def test_label_sources_are_recorded_and_the_teacher_skips_corrected_rows(store: InteractionStore) -> None:
    corrected = add(store, T0)
    set_correction(store.conn, corrected, validate_correction({"text": "turn on the porch light"}))
    plain = add(store, T0 + 1000, intent=None)
    add(store, T0 + 2000, kind="text")
    assert [r["id"] for r in rows_needing_teacher(store.conn, 10)] == [plain]  # audio, not corrected
    labels, _ = compute_labels(store.conn, SETTINGS, now=NOW)
    record_label_sources(store.conn, labels, now=NOW)
    sources = dict(store.conn.execute("SELECT id, label_source FROM interactions").fetchall())
    assert sources[corrected] == "correction" and sources[plain] is None


def old_log(tmp_path: Path, version: int) -> InteractionStore:
    """A log as a release at schema `version` left it, with one row, opened (so migrated) by this one."""
    folder = tmp_path / "log"
    folder.mkdir()
    steps = "\n".join(MIGRATIONS[:version])
    with closing(sqlite3.connect(folder / DB_FILE, isolation_level=None)) as conn:
        conn.executescript(f"BEGIN;\n{steps}\nPRAGMA user_version = {version};\nCOMMIT;")
        conn.execute("INSERT INTO interactions (created_at, kind, transcript) VALUES (1, 'audio', 'hi')")
    store = InteractionStore(folder)
    store.open()
    return store


def test_a_version_1_log_is_migrated_to_the_label_source_and_adaptations(tmp_path: Path) -> None:
    store = old_log(tmp_path, 1)
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert "label_source" in {row[1] for row in conn.execute("PRAGMA table_info(interactions)")}
        assert conn.execute("SELECT transcript, label_source FROM interactions").fetchall() == [("hi", None)]
        conn.execute(
            "INSERT INTO adaptations (started_at, status, report) VALUES (1, 'skipped', ?)", (json.dumps({}),)
        )
    finally:
        store.close()


def test_a_version_2_log_is_migrated_to_the_withheld_intent(tmp_path: Path) -> None:
    """A log written before answers were withheld keeps its rows; they have no withheld intent."""
    store = old_log(tmp_path, 2)
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT transcript, withheld FROM interactions").fetchall() == [("hi", None)]
        unsure = Intent("HassTurnOn", {"name": "porch light"})
        row = store.add(Interaction(kind="audio", transcript="turn on the porch light", withheld=unsure))
        (raw,) = conn.execute("SELECT withheld FROM interactions WHERE id = ?", (row,)).fetchone()
        assert Intent.from_json(json.loads(raw)) == unsure
    finally:
        store.close()


def test_a_version_3_log_is_migrated_to_the_clips_key(tmp_path: Path) -> None:
    """A log written before rows kept their clip's key keeps its rows, without one (a delete reads their
    clips instead: `test_store`)."""
    store = old_log(tmp_path, 3)
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT transcript, audio_key FROM interactions").fetchall() == [("hi", None)]
    finally:
        store.close()


def test_a_version_4_log_is_migrated_so_that_no_id_is_given_twice(tmp_path: Path) -> None:
    """The table is rebuilt with AUTOINCREMENT: rows, ids and indexes kept; the id of the newest row,
    deleted, is not given to the next (before, it was: a night then took the new row for the deleted)."""
    store = old_log(tmp_path, 4)
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT id, transcript, audio_key FROM interactions").fetchall() == [
            (1, "hi", None)
        ]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(interactions)")}
        assert {"interactions_created_at", "interactions_conversation"} <= indexes
        assert store.delete([1]) == 1
        assert store.add(Interaction(kind="audio", transcript="after")) == 2
    finally:
        store.close()


def test_a_migration_the_disk_cannot_hold_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    """The v5 rebuild of a 3000-row log on a disk that takes no file past 300 KB (the log itself is 600
    KB; `RLIMIT_FSIZE`): the open fails with the reason, not as damage (the server then answers without
    logging: `test_server`), and the log stays at version 4 with every row; with room, it migrates."""
    folder = tmp_path / "log"
    folder.mkdir()
    with closing(sqlite3.connect(folder / DB_FILE, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # as a version-4 server left it
        conn.executescript(f"BEGIN;\n{chr(10).join(MIGRATIONS[:4])}\nPRAGMA user_version = 4;\nCOMMIT;")
        conn.executemany(
            "INSERT INTO interactions (created_at, kind, transcript) VALUES (?, 'audio', ?)",
            [(i, f"turn on the kitchen light {i} " * 5) for i in range(3000)],
        )
    assert (folder / DB_FILE).stat().st_size > 500_000
    opening = f"from wyoming_tinyalign.store import InteractionStore as S; S({str(folder)!r}).open()"
    proc = subprocess.run(
        [sys.executable, "-c", opening], capture_output=True, text=True, timeout=120,
        preexec_fn=file_size_limit(300_000),
    )  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("wyoming_tinyalign.store.StoreError: cannot open the interaction log"), last
    with closing(sqlite3.connect(folder / DB_FILE)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
        assert conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 3000
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    store = InteractionStore(folder)
    store.open()
    try:
        assert store.conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 3000
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        store.close()
