"""The interaction log on a real SQLite file: schema and migrations, audio files, retention, threads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from serving import tear_live_root_page

from wyoming_tinyalign import store as store_module
from wyoming_tinyalign.adapt import ADAPT_DIR, FEATURES_DIR, PREDICTIONS_DIR, STATE_FILE, NightData
from wyoming_tinyalign.audio import read_wav
from wyoming_tinyalign.intents import Intent
from wyoming_tinyalign.store import (
    DB_FILE,
    MAX_ID,
    SCHEMA_VERSION,
    Interaction,
    InteractionStore,
    StoreDamaged,
    StoreError,
)
from wyoming_tinyalign.train import FeatureCache

LABELS = {"correction", "teacher_transcript", "teacher_confidence", "ha_outcome", "labelled_at"}


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def utterance(**fields: object) -> Interaction:
    base: dict = {"kind": "audio", "client": "10.0.0.7:5000", "language": "en", "path": "cascade"}
    return Interaction(**(base | fields))


def test_a_new_log_is_wal_at_the_current_schema_with_label_columns(store: InteractionStore) -> None:
    conn = store.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    columns = {row[1] for row in conn.execute("PRAGMA table_info(interactions)")}
    assert LABELS | {"created_at", "client", "satellite_id", "conversation_id", "audio_path"} <= columns
    assert {"duration_s", "path", "transcript", "intent", "latency_ms", "projector_version"} <= columns


def test_an_utterance_is_logged_with_its_audio(store: InteractionStore) -> None:
    audio = tone(1.5)
    intent = Intent("HassTurnOn", {"name": "porch light"})
    row_id = store.add(
        utterance(transcript="turn on the porch light", intent=intent, duration_s=1.5, latency_ms=80.0,
                  projector_version="abc123", context={"conversation_id": "c1", "satellite_id": "kitchen"},
                  conversation_id="c1", satellite_id="kitchen"),
        audio,
    )  # fmt: skip
    with closing(sqlite3.connect(store.db_path)) as other:  # a second connection sees it committed
        other.row_factory = sqlite3.Row
        row = other.execute("SELECT * FROM interactions WHERE id = ?", (row_id,)).fetchone()
    assert row["transcript"] == "turn on the porch light" and row["satellite_id"] == "kitchen"
    assert Intent.from_json(json.loads(row["intent"])) == intent
    assert json.loads(row["context"]) == {"conversation_id": "c1", "satellite_id": "kitchen"}
    wav = store.folder / row["audio_path"]
    assert row["audio_path"].startswith("audio/") and wav.stat().st_size == row["audio_bytes"]
    np.testing.assert_allclose(read_wav(wav), audio, atol=1e-4)
    assert all(row[label] is None for label in LABELS)


def test_no_audio_is_kept_when_audio_logging_is_off(tmp_path: Path) -> None:
    s = InteractionStore(tmp_path / "log", log_audio=False)
    s.open()
    row_id = s.add(utterance(transcript="hello"), tone(1.0))
    query = "SELECT transcript, audio_path, audio_bytes FROM interactions WHERE id = ?"
    assert s.conn.execute(query, (row_id,)).fetchone() == ("hello", None, 0)
    s.close()
    assert not (tmp_path / "log" / "audio").exists()


def test_no_recordings_are_kept_while_the_disk_is_low(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Below `min_free_bytes` free (here more than this disk has) rows are logged without audio, with one
    warning; with room again, recordings are kept, and it says so once."""
    caplog.set_level(logging.INFO, "wyoming_tinyalign.store")
    free = shutil.disk_usage(tmp_path).free
    s = InteractionStore(tmp_path / "log", min_free_bytes=free + (1 << 40))
    s.open()
    try:
        low = [s.add(utterance(transcript=f"low {i}"), tone(0.5)) for i in range(2)]
        assert s.disk_low and caplog.text.count("recordings are not kept until over") == 1
        s.min_free_bytes = 1 << 20
        row_id = s.add(utterance(transcript="room"), tone(0.5))
        assert not s.disk_low and caplog.text.count("recordings are kept") == 1
        paths = dict(s.conn.execute("SELECT id, audio_path FROM interactions").fetchall())
    finally:
        s.close()
    assert [paths[i] for i in low] == [None, None] and (tmp_path / "log" / paths[row_id]).is_file()


def test_linking_a_conversation_keeps_what_was_known(store: InteractionStore) -> None:
    row_id = store.add(utterance(transcript="x", satellite_id="hall"), tone(0.2))
    store.link(row_id, {"conversation_id": "conv-1", "device_id": "dev-9", "satellite_id": None})
    row = store.conn.execute(
        "SELECT conversation_id, device_id, satellite_id, context FROM interactions WHERE id = ?", (row_id,)
    ).fetchone()
    assert row[:3] == ("conv-1", "dev-9", "hall")
    assert json.loads(row[3])["conversation_id"] == "conv-1"


def test_retention_by_age_deletes_rows_and_audio(tmp_path: Path) -> None:
    s = InteractionStore(tmp_path / "log", retention_days=7)
    s.open()
    now = time.time()
    old = s.add(utterance(created_at=now - 8 * 86400), tone(0.5))
    new = s.add(utterance(created_at=now - 1 * 86400), tone(0.5))
    old_wav = (
        s.folder / s.conn.execute("SELECT audio_path FROM interactions WHERE id = ?", (old,)).fetchone()[0]
    )
    assert old_wav.is_file()
    assert s.prune(now) == 1
    assert [r[0] for r in s.conn.execute("SELECT id FROM interactions")] == [new]
    assert not old_wav.exists() and not old_wav.parent.exists()  # the emptied day folder too
    s.close()


def test_retention_forgets_what_the_nights_derived_from_a_clip(tmp_path: Path) -> None:
    """A clip that retention deletes takes its cached features (under every encoder) and the answers
    the nights kept for it along (`adapt.NightData`); the clip that stays keeps its own. What a killed
    night left (its manifests, with the household's words) goes too, and the row's label digest."""
    s = InteractionStore(tmp_path / "log", retention_days=7, derived=NightData(tmp_path))
    s.open()
    now = time.time()
    s.add(utterance(created_at=now - 8 * 86400), tone(0.5))
    s.add(utterance(created_at=now - 1 * 86400), tone(0.7))
    wavs = [s.folder / rel for (rel,) in s.conn.execute("SELECT audio_path FROM interactions ORDER BY id")]
    old, new = (FeatureCache.key(read_wav(wav)) for wav in wavs)
    features = [
        tmp_path / FEATURES_DIR / enc / k[:2] / f"{k}.safetensors" for enc in ("e1", "e2") for k in (old, new)
    ]
    for path in features:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"features")
    answers = tmp_path / ADAPT_DIR / PREDICTIONS_DIR / "projector-d1.json"
    answers.parent.mkdir(parents=True)
    answers.write_text(json.dumps({f"{k}/ref": ["heard", None] for k in (old, new, "g0")}))
    manifest = tmp_path / ADAPT_DIR / "manifests" / "train.jsonl"  # as a night killed mid-way leaves it
    manifest.parent.mkdir()
    manifest.write_text('{"audio": "../../log/audio/x.wav", "text": "what the family said"}\n')
    state = tmp_path / ADAPT_DIR / STATE_FILE  # the last night's digest of each row's label
    state.write_text(json.dumps({"data_hash": "h", "labels": {"1": "digest of 1", "2": "digest of 2"}}))
    assert s.prune(now) == 1
    assert [p.exists() for p in features] == [False, True, False, True]
    assert set(json.loads(answers.read_text())) == {f"{new}/ref", "g0/ref"}
    assert not manifest.parent.exists()
    assert json.loads(state.read_text()) == {"data_hash": "h", "labels": {"2": "digest of 2"}}
    s.close()


def test_a_clip_is_logged_with_the_key_its_file_reads_back_by(tmp_path: Path) -> None:
    """The row keeps its clip's key (what the nights cache its features by), the same as read from the
    file: for quiet, loud (clipped) and noisy audio. Without derived data (`derived=None`) there is none."""
    rng = np.random.default_rng(0)
    clips = [tone(0.3), 5.0 * tone(0.3), 1e-5 * tone(0.3), rng.normal(0, 0.4, 4800).astype(np.float32)]
    s = InteractionStore(tmp_path / "log", derived=NightData(tmp_path))
    s.open()
    plain = InteractionStore(tmp_path / "plain")
    plain.open()
    try:
        for audio in clips:
            s.add(utterance(), audio)
            plain.add(utterance(), audio)
        rows = s.conn.execute("SELECT audio_path, audio_key FROM interactions ORDER BY id").fetchall()
        assert [key for _, key in rows] == [FeatureCache.key(read_wav(s.folder / rel)) for rel, _ in rows]
        assert len({key for _, key in rows}) == len(clips)
        assert (
            plain.conn.execute("SELECT COUNT(*) FROM interactions WHERE audio_key IS NULL").fetchone()[0] == 4
        )
    finally:
        s.close()
        plain.close()


def test_a_delete_finds_what_was_derived_by_the_rows_key_or_else_by_reading_the_clip(tmp_path: Path) -> None:
    """A delete reads no clip that was logged with its key, so a clip whose file no longer reads (a bad
    block) still takes its cached features along; a clip logged before the log kept keys is read back."""
    s = InteractionStore(tmp_path / "log", derived=NightData(tmp_path))
    s.open()
    try:
        unreadable, old, kept = (s.add(utterance(), tone(seconds)) for seconds in (0.3, 0.4, 0.5))
        rows = {
            i: (rel, key)
            for i, rel, key in s.conn.execute("SELECT id, audio_path, audio_key FROM interactions")
        }
        features = {
            i: tmp_path / FEATURES_DIR / "enc" / k[:2] / f"{k}.safetensors" for i, (_, k) in rows.items()
        }
        for path in features.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"features")
        (s.folder / rows[unreadable][0]).write_bytes(b"RIFF, and then nothing a WAV reader reads")
        s.conn.execute("UPDATE interactions SET audio_key = NULL WHERE id = ?", (old,))  # logged before v4
        assert s.delete([unreadable, old]) == 2
        assert [features[i].exists() for i in (unreadable, old, kept)] == [False, False, True]
    finally:
        s.close()


def test_retention_waits_while_a_night_runs(tmp_path: Path) -> None:
    """While a night holds the job lock (here another process, as `wyoming-tinyalign adapt` started by
    hand beside the server), logging does not prune: a row deleted under the night would discard its
    work. Once the lock is released, the next `add` prunes."""
    s = InteractionStore(tmp_path / "log", retention_days=7, derived=NightData(tmp_path))
    s.open()
    holder = "from wyoming_tinyalign.adapt import job_lock; import sys\n" \
        "with job_lock(__import__('pathlib').Path(sys.argv[1])) as free:\n" \
        "    print(free, flush=True); sys.stdin.read()"  # fmt: skip
    night = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / ADAPT_DIR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert night.stdout is not None and night.stdout.readline() == "True\n"
        old = s.add(utterance(created_at=time.time() - 8 * 86400), tone(0.3))
        s._last_prune -= store_module.PRUNE_EVERY_S  # the store would prune at this add
        s.add(utterance(), tone(0.3))
        assert old in {r[0] for r in s.conn.execute("SELECT id FROM interactions")}
        night.communicate("", timeout=30)  # the night ends
        s.add(utterance(), tone(0.3))
        assert old not in {r[0] for r in s.conn.execute("SELECT id FROM interactions")}
    finally:
        night.kill()
        s.close()


def test_an_id_is_never_given_twice(store: InteractionStore) -> None:
    """Deleting the newest row, or every row, does not free their ids for the next ones logged: a night
    or a page still naming a deleted row must not find another in its place."""
    ids = [store.add(utterance(transcript=str(i)), None) for i in range(3)]
    assert store.delete([ids[-1]]) == 1
    assert store.add(utterance(transcript="next"), None) == ids[-1] + 1
    assert store.delete(list(range(1, ids[-1] + 2))) == 3
    assert store.add(utterance(transcript="after delete all"), None) == ids[-1] + 2


def test_retention_by_size_forgets_the_oldest_first(tmp_path: Path) -> None:
    s = InteractionStore(tmp_path / "log")
    s.open()
    now = time.time()
    ids = [s.add(utterance(created_at=now - 100 + i), tone(1.0)) for i in range(5)]
    size = s.conn.execute("SELECT MAX(audio_bytes) FROM interactions").fetchone()[0]
    s.retention_bytes = 2 * size  # room for two
    assert s.prune(now) == 3
    kept = [r[0] for r in s.conn.execute("SELECT id FROM interactions ORDER BY id")]
    assert kept == ids[-2:]
    assert len(list((s.folder / "audio").rglob("*.wav"))) == 2
    s.close()


def test_deleted_interactions_leave_no_words_on_disk(tmp_path: Path) -> None:
    """Deleting rows overwrites their words in the database file, and empties the write-ahead log that
    still held them: what the household deleted cannot be read back from the disk."""
    store = InteractionStore(tmp_path)
    store.open()
    said = [f"unlock the diary {i}" if i % 50 == 7 else f"turn on lamp {i}" for i in range(300)]
    ids = [store.add(utterance(kind="text", created_at=time.time(), transcript=text)) for text in said]
    store.close()  # the rows go into the database file itself
    store = InteractionStore(tmp_path)
    store.open()
    try:
        assert store.delete([i for i, text in zip(ids, said, strict=True) if "diary" in text]) == 6
        disk = b"".join(path.read_bytes() for path in tmp_path.glob("interactions.sqlite3*"))
        assert b"unlock the diary" not in disk and b"turn on lamp 299" in disk
    finally:
        store.close()


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    s = InteractionStore(tmp_path / "log")
    s.open()
    s.add(utterance(transcript="kept"), None)
    s.close()
    s.open()
    assert s.conn.execute("SELECT transcript FROM interactions").fetchall() == [("kept",)]
    s.close()


def test_audio_files_a_crash_left_without_a_row_are_swept(tmp_path: Path) -> None:
    """A kill between writing a clip and logging its row, or inside an atomic write, leaves audio no row
    names: private audio that neither retention nor a delete would ever remove."""
    store = InteractionStore(tmp_path)
    store.open()
    kept = store.add(utterance(created_at=time.time()), tone(0.5))
    gone = store.add(utterance(created_at=time.time() - 86400), tone(0.5))
    (kept_rel,) = store.conn.execute("SELECT audio_path FROM interactions WHERE id = ?", (kept,)).fetchone()
    store.conn.execute("DELETE FROM interactions WHERE id = ?", (gone,))  # as if the row was never logged
    stray = tmp_path / "audio" / "2020-01-01" / ".0123.wav.x1y2.tmp"  # half of an atomic write
    stray.parent.mkdir()
    stray.write_bytes(b"RIFF")
    store.close()
    store = InteractionStore(tmp_path)
    store.open()
    try:
        assert store.sweep() == 2
        left = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "audio").rglob("*"))
        assert left == [str(Path(kept_rel).parent), kept_rel]  # and the emptied day folders are gone
        assert read_wav(tmp_path / kept_rel).size == 8000 and store.sweep() == 0
    finally:
        store.close()


def damage(db: Path, how: str) -> None:
    """What a power cut on an SD card can leave: a file that is no database, or one with a torn page."""
    with open(db, "r+b") as f:
        if how == "not a database":
            f.write(os.urandom(4096))
        else:
            f.seek(4 * 4096)  # a page of the interactions table (4 KB pages)
            f.write(os.urandom(4096))


@pytest.mark.parametrize(
    ("how", "next_id"),
    [
        ("not a database", 1),  # the header torn: nothing says how far the ids went
        ("a torn page", 202),
        ("a torn page, its sequence garbled", 1),  # beyond `MAX_ID`: not taken, the ids would run out
    ],
)
def test_a_damaged_log_is_set_aside_with_its_audio_and_a_new_one_starts(
    tmp_path: Path, how: str, next_id: int
) -> None:
    """Opening a damaged log says so (`StoreDamaged`); `start_over` moves it and its audio into a
    damaged-<time> folder and opens a new log, whose ids go on from the old one's where its file still
    says how far they went; retention deletes that folder once it is old."""
    s = InteractionStore(tmp_path / "log")
    s.open()
    for i in range(200):  # some pages of rows
        s.add(utterance(transcript=f"turn on the light number {i} " * 4), None)
    s.add(utterance(transcript="with audio"), tone(0.5))
    if how.endswith("garbled"):
        s.conn.execute("UPDATE sqlite_sequence SET seq = ?", (MAX_ID * 2,))
    s.close()
    damage(tmp_path / "log" / DB_FILE, how)
    s = InteractionStore(tmp_path / "log", retention_days=7)
    with pytest.raises(
        StoreDamaged, match="not a database" if how == "not a database" else "malformed"
    ) as err:
        s.open()
    s.start_over(err.value)
    (aside,) = s.set_aside_logs()
    try:
        assert aside.parent == s.folder and aside.name.startswith("damaged-")
        assert (aside / DB_FILE).is_file() and len(list((aside / "audio").rglob("*.wav"))) == 1
        assert s.conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 0
        assert s.sweep() == 0 and not (s.folder / "audio").exists()
        first = s.add(utterance(transcript="the first of the new log"), tone(0.5))
        assert first == next_id
        assert s.prune() == 0 and aside.is_dir()  # kept as long as interactions are
        week_ago = time.time() - 8 * 86400
        os.utime(aside, (week_ago, week_ago))
        s.prune()
        assert not aside.exists() and s.conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0] == 1
    finally:
        s.close()


async def test_a_log_damaged_while_in_use_is_set_aside_once_and_not_again_soon(tmp_path: Path) -> None:
    """Found damaged by logging an utterance through the server's API: set aside with its audio, and the
    utterance goes to a new log. Damaged again within `START_OVER_EVERY_S` (a failing disk), the write
    fails instead of leaving a folder per utterance; after that, it is set aside again. A read that
    finds it damaged sets it aside and fails once."""
    s = InteractionStore(tmp_path / "log")
    s.open()
    try:
        await s.async_add(utterance(transcript="before"), tone(0.5))
        tear_live_root_page(s.db_path)
        assert await s.async_add(utterance(transcript="after"), tone(0.5)) == 2  # ids go on
        (aside,) = s.set_aside_logs()
        assert len(list((aside / "audio").rglob("*.wav"))) == 1 and len(list(s.folder.rglob("*.wav"))) == 2
        assert s.conn.execute("SELECT transcript FROM interactions").fetchall() == [("after",)]
        tear_live_root_page(s.db_path)
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            await s.async_add(utterance(transcript="lost"), tone(0.5))
        assert s.set_aside_logs() == [aside] and len(list(s.folder.rglob("*.wav"))) == 2
        s._started_over -= store_module.START_OVER_EVERY_S  # the time passes
        assert await s.async_add(utterance(transcript="later"), tone(0.5)) == 3
        assert len(s.set_aside_logs()) == 2 and s.set_aside_logs()[0] == aside

        def transcripts() -> list[tuple[str]]:  # a read, as the page's: it fails once, is not run again
            return s.conn.execute("SELECT transcript FROM interactions").fetchall()

        tear_live_root_page(s.db_path)
        s._started_over -= store_module.START_OVER_EVERY_S
        with pytest.raises(sqlite3.DatabaseError, match="malformed"):
            await s.async_call(transcripts)
        assert len(s.set_aside_logs()) == 3 and await s.async_call(transcripts) == []
    finally:
        await s.async_close()


async def test_a_damaged_log_that_cannot_be_set_aside_stays_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk gone read-only refuses the set-aside folder: the write fails with that error and the log
    stays open as it was (not closed for good), so it is set aside once the disk takes it."""
    s = InteractionStore(tmp_path / "log")
    s.open()
    try:
        await s.async_add(utterance(transcript="before"), tone(0.5))
        tear_live_root_page(s.db_path)
        set_aside = s.set_aside

        def read_only() -> Path:
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(s, "set_aside", read_only)
        with pytest.raises(OSError, match="Read-only"):
            await s.async_add(utterance(transcript="refused"), tone(0.5))
        assert s._conn is not None and s.set_aside_logs() == [] and s.db_path.is_file()
        monkeypatch.setattr(s, "set_aside", set_aside)
        assert await s.async_add(utterance(transcript="taken"), tone(0.5)) == 2
        assert len(s.set_aside_logs()) == 1
    finally:
        await s.async_close()


def test_the_audio_cap_counts_a_damaged_log_set_aside_and_deletes_it_first(tmp_path: Path) -> None:
    """`retention_bytes` caps all recorded audio on the disk: the audio of a damaged log set aside is older
    than the new log's, so it goes first when the total is over; then the new log's oldest rows."""
    s = InteractionStore(tmp_path / "log")
    s.open()
    for _ in range(3):
        s.add(utterance(created_at=time.time() - 3600), tone(1.0))
    s.close()
    aside = s.set_aside()
    s.open()
    try:
        ids = [s.add(utterance(), tone(1.0)) for _ in range(3)]
        clip = s.conn.execute("SELECT MAX(audio_bytes) FROM interactions").fetchone()[0]
        s.retention_bytes = 6 * clip  # room for all six
        assert s.prune() == 0 and aside.is_dir()
        s.retention_bytes = 3 * clip  # room for the new log's three: the set-aside log goes, not a row
        assert s.prune() == 0 and not aside.exists()
        s.retention_bytes = 2 * clip
        assert s.prune() == 1
        assert [r[0] for r in s.conn.execute("SELECT id FROM interactions ORDER BY id")] == ids[1:]
    finally:
        s.close()


def test_a_log_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    with closing(sqlite3.connect(tmp_path / "log" / "interactions.sqlite3")) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        InteractionStore(tmp_path / "log").open()


def test_migrations_run_in_order_and_a_failed_one_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = InteractionStore(tmp_path / "log")
    s.open()
    s.add(utterance(transcript="before"), None)
    s.close()
    current = store_module.SCHEMA_VERSION
    broken = "ALTER TABLE interactions ADD COLUMN mood TEXT; THIS IS NOT SQL;"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, broken))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", current + 1)
    with pytest.raises(StoreError):
        InteractionStore(tmp_path / "log").open()
    with closing(sqlite3.connect(tmp_path / "log" / "interactions.sqlite3")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == current
        assert "mood" not in {row[1] for row in conn.execute("PRAGMA table_info(interactions)")}
    fixed = "ALTER TABLE interactions ADD COLUMN mood TEXT;"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS[:current], fixed))
    s = InteractionStore(tmp_path / "log")
    s.open()
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert s.conn.execute("SELECT transcript, mood FROM interactions").fetchall() == [("before", None)]
    s.close()


async def test_the_async_api_runs_sqlite_on_the_stores_own_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = InteractionStore(tmp_path / "log")
    threads: set[str] = set()
    add = s.add

    def recording_add(interaction: Interaction, audio: np.ndarray | None = None) -> int:
        threads.add(threading.current_thread().name)
        return add(interaction, audio)

    monkeypatch.setattr(s, "add", recording_add)
    s.open()
    ids = [await s.async_add(utterance(transcript=str(i)), tone(0.1)) for i in range(3)]
    await s.async_link(ids[0], {"conversation_id": "c"})
    await s.async_close()
    assert ids == [1, 2, 3]
    assert len(threads) == 1 and threads.pop().startswith("store")
    with closing(sqlite3.connect(tmp_path / "log" / "interactions.sqlite3")) as conn:
        assert conn.execute("SELECT COUNT(*), MAX(conversation_id) FROM interactions").fetchone() == (3, "c")
