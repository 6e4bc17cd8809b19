"""The interaction log: one SQLite row per interaction (WAL mode) and the utterance's audio as a WAV file.

    DATA_DIR/log/interactions.sqlite3
    DATA_DIR/log/audio/YYYY-MM-DD/<uuid>.wav     16 kHz 16-bit mono: what the model heard

The schema is versioned with `PRAGMA user_version`: `MIGRATIONS[i]` takes a database from version `i` to
`i + 1` in one transaction, so a crash mid-migration leaves the old version. The label columns
(`correction`, `teacher_transcript`, `teacher_confidence`, `ha_outcome`, `labelled_at`, `label_source`)
are filled by the review API and the nightly adaptation (`labels.py`), whose runs and reports go to the
`adaptations` table (`adapt.py`). Retention: interactions older than `retention_days`, and the oldest
ones past `retention_bytes` of audio, are deleted with their audio files (not while a night runs).
When the disk refuses an utterance's audio (full), or leaves less than `min_free_bytes` free, its row is
logged without it; audio files a crash left without a row are deleted when the server starts (`sweep`).
Every delete (the API's and retention's) also forgets what was derived from the clips (`Derived`: the
nights' cached features and answers), after the rows are gone, so a night running meanwhile sees the
rows missing; a correction whose transcript changes or goes (`correct`) takes with it what the nights
remembered of its words.
A damaged database (`StoreDamaged`, when the server starts, or an SQLite error saying so while it runs)
is set aside with its audio and a new one starts (`start_over`).

The server opens the log before its event loop starts, then uses the `async_*` methods: every SQLite
call and file write runs on the store's own thread, in order, never on the event loop and never queued
behind a model run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from .audio import AudioError, as_stored, read_wav, write_wav
from .intents import Intent
from .labels import parse_correction, set_correction
from .words import counted

_LOGGER = logging.getLogger(__name__)

DB_FILE = "interactions.sqlite3"
AUDIO_DIR = "audio"
DAMAGED_PREFIX = "damaged-"  # a damaged log set aside (`InteractionStore.set_aside`)
PRUNE_EVERY_S = 600.0
# A log found damaged again this soon after a new one started is not set aside once more: a failing disk
# would leave a folder per utterance. Its writes fail (and are logged) until then.
START_OVER_EVERY_S = 600.0
MAX_ID = 1 << 40  # an id read from a damaged log above this is taken for damage (`start_over`)
NO_LOG = "--no-log"  # why logging is off when the household turned it off (`serve.open_log`)
MIN_FREE_BYTES = 1 << 30  # below this much free disk, no recordings are kept (`--min-free-mb`)
T = TypeVar("T")

# The interactions table's columns of schema version 1 (after `id`), and its indexes: written out
# once, for the table (0 -> 1) and again when it is rebuilt (4 -> 5).
_INTERACTION_COLUMNS = """
        created_at REAL NOT NULL,           -- unix time (UTC) the request arrived
        kind TEXT NOT NULL,                 -- 'audio' (an utterance) or 'text' (a typed/HA text request)
        client TEXT,                        -- peer address of the Wyoming client
        satellite_id TEXT,
        device_id TEXT,
        conversation_id TEXT,
        context TEXT,                       -- the client's Wyoming context, JSON
        language TEXT,
        audio_path TEXT,                    -- relative to the log folder; NULL when audio is not kept
        audio_bytes INTEGER NOT NULL DEFAULT 0,
        duration_s REAL,
        path TEXT,                          -- aligned / readout / cascade / text
        transcript TEXT,
        intent TEXT,                        -- {"name": ..., "slots": {...}} JSON; NULL = not recognized
        confidence REAL,
        latency_ms REAL,                    -- end of speech (audio-stop) -> result, queueing included
        model_ms REAL,                      -- the model run alone
        projector_version TEXT,
        correction TEXT,                    -- labels, filled by the nightly adaptation
        teacher_transcript TEXT,
        teacher_confidence REAL,
        ha_outcome TEXT,
        labelled_at REAL"""
_INTERACTION_INDEXES = """
    CREATE INDEX interactions_created_at ON interactions (created_at);
    CREATE INDEX interactions_conversation ON interactions (conversation_id);
"""
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the interactions table.
    f"CREATE TABLE interactions (id INTEGER PRIMARY KEY, {_INTERACTION_COLUMNS});{_INTERACTION_INDEXES}",
    # 1 -> 2: the label the nightly adaptation used for a row, and its runs (see adapt.py, labels.py).
    """
    ALTER TABLE interactions ADD COLUMN label_source TEXT;  -- correction / teacher / outcome
    CREATE TABLE adaptations (
        id INTEGER PRIMARY KEY,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL,               -- running / skipped / promoted / rejected / failed
        reason TEXT,
        serving_version TEXT,               -- the projector version served when the run started
        version TEXT,                       -- the version it made (promoted, or kept as rejected)
        data_hash TEXT,
        report TEXT                         -- JSON: data sizes, label sources, metrics, loss curve, ...
    );
    CREATE INDEX adaptations_started_at ON adaptations (started_at);
    """,
    # 2 -> 3: the intent heard but not acted on (its confidence was under `serve --min-confidence`).
    """
    ALTER TABLE interactions ADD COLUMN withheld TEXT;  -- {"name": ..., "slots": {...}} JSON
    """,
    # 3 -> 4: the key of the row's clip (`Derived.key`), so that a delete finds what the nights derived
    # from it without reading the clip back; NULL for clips logged before (a delete reads those).
    """
    ALTER TABLE interactions ADD COLUMN audio_key TEXT;
    """,
    # 4 -> 5: a row's id is never given again (AUTOINCREMENT): the id of the newest row, deleted, went to
    # the next one logged, and a night checking which of its rows were deleted (`adapt.Job._gone`), or a
    # page still showing the deleted row, took the new row for it. SQLite rebuilds the table for that.
    f"""
    CREATE TABLE interactions_v5 (
        id INTEGER PRIMARY KEY AUTOINCREMENT, {_INTERACTION_COLUMNS},
        label_source TEXT, withheld TEXT, audio_key TEXT
    );
    INSERT INTO interactions_v5 SELECT * FROM interactions;
    DROP TABLE interactions;
    ALTER TABLE interactions_v5 RENAME TO interactions;
    {_INTERACTION_INDEXES}
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

Doomed = tuple[int, str | None, str | None]  # a row to delete: id, audio_path, audio_key


class StoreError(Exception):
    """An interaction log that cannot be used, with the reason."""


class StoreDamaged(StoreError):
    """A database file that is not one, or is damaged (a power cut on an SD card): `set_aside`."""


@dataclass
class Interaction:
    """One logged request and what the server made of it."""

    kind: str
    created_at: float = field(default_factory=time.time)
    client: str | None = None
    satellite_id: str | None = None
    device_id: str | None = None
    conversation_id: str | None = None
    context: dict[str, Any] | None = None
    language: str | None = None
    duration_s: float | None = None
    path: str | None = None
    transcript: str | None = None
    intent: Intent | None = None
    confidence: float | None = None
    latency_ms: float | None = None
    model_ms: float | None = None
    projector_version: str | None = None
    withheld: Intent | None = None  # heard, but too unsure to act on: `intent` is None


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to `SCHEMA_VERSION`, one transaction per step; returns the version found."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the interaction log has schema version {found}, newer than this version reads "
            f"({SCHEMA_VERSION}); upgrade wyoming-tinyalign or move the log away"
        )
    for version in range(found, SCHEMA_VERSION):
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        _LOGGER.info("interaction log migrated to schema version %d", version + 1)
    return found


class Derived(Protocol):
    """What is derived from logged clips elsewhere (`adapt.NightData`), named by a key per clip."""

    def key(self, audio: np.ndarray) -> str:
        """A clip's key, from its samples as its file reads back (float32 mono 16 kHz)."""
        ...

    def forget(self, keys: set[str], ids: set[int]) -> None:
        """Delete what was derived from these clips and rows."""
        ...

    def forget_words(self, keys: set[str]) -> None:
        """The transcripts these clips were corrected to changed or went: forget what was kept of those
        words (the clips' features and answers stay: the audio is the same)."""
        ...

    def night_running(self) -> bool:
        """True while a night runs on these clips: retention waits, since a row it deleted would discard
        the night's work as a delete by the household does (`adapt`). A delete still deletes."""
        ...


class InteractionStore:
    """SQLite (WAL) + audio files under `folder`, with retention by age and by total audio size."""

    def __init__(
        self,
        folder: Path,
        *,
        log_audio: bool = True,
        retention_days: float | None = None,
        retention_bytes: int | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
        derived: Derived | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.derived = derived
        self.log_audio = log_audio
        self.retention_days = retention_days or None
        self.retention_bytes = retention_bytes or None
        self.min_free_bytes = min_free_bytes
        self.disk_low = False  # the last `add` found less than `min_free_bytes` free: no recordings kept
        self.write_error: str | None = None  # why the last utterance could not be logged (None: it was)
        self._conn: sqlite3.Connection | None = None
        self._last_prune = 0.0
        self._started_over = -START_OVER_EVERY_S
        self._top_id = 0  # the highest row id given, as far as known: a log started over goes on from it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    @property
    def db_path(self) -> Path:
        return self.folder / DB_FILE

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the interaction log is not open")
        return self._conn

    # ------------------------------------------------------------------ sync API (one thread at a time)
    def open(self) -> None:
        """Open (or create) the database, check and migrate it, apply retention. A damaged one raises
        `StoreDamaged`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30)
        except sqlite3.Error as err:
            raise StoreError(f"cannot open the interaction log {self.db_path}: {err}") from err
        try:
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA secure_delete = ON")  # deleted words are overwritten, whatever the build
            problems = [row for (row,) in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise StoreDamaged(f"the interaction log {self.db_path} is damaged: {'; '.join(problems)}")
            migrate(conn)
            conn.execute("PRAGMA journal_mode = WAL")  # after `migrate`: a newer version's log is left as is
            top = _top_id(conn)
        except StoreError:
            conn.close()
            raise
        except sqlite3.Error as err:
            conn.close()
            kind = StoreDamaged if _damage(err) else StoreError
            raise kind(f"cannot open the interaction log {self.db_path}: {err}") from err
        self._conn = conn
        self._top_id = max(self._top_id, top)
        self.prune()

    def start_over(self, problem: Exception) -> None:
        """The log is damaged (`problem`): set it aside with its audio, close it and open a new one.
        Answering matters more than the log, and the damaged one is kept (`set_aside`). If it cannot be
        set aside (`OSError`: a disk gone read-only), the open log stays as it was. The new log's ids go on
        from the old one's, so that no id names two utterances (a night's, a page's)."""
        if self._conn is None:  # at start-up: what the damaged file still says
            read_only = f"file:{self.db_path}?mode=ro"
            with suppress(sqlite3.Error), closing(sqlite3.connect(read_only, uri=True)) as damaged:
                if (top := _top_id(damaged)) < MAX_ID:  # not a damaged page's garbage: it would use up ids
                    self._top_id = max(self._top_id, top)
        aside = self.set_aside()  # an open connection keeps the files it has open, wherever they go
        self.close()
        _LOGGER.error("%s; set aside in %s, with its audio; a new log starts", problem, aside)
        self._started_over = time.monotonic()
        self.open()
        # the new log's row there is written by migration 5 (its rows copied: none), so an UPDATE does
        self.conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'interactions'", (self._top_id,))

    def set_aside(self) -> Path:
        """Move a damaged log (the database and the audio it names) into a `damaged-<time>` folder beside
        them, for a new one to start; returns that folder. It is kept for `retention_days`, and goes with
        *Delete all* (`remove_set_aside`). SQLite's shell prints the rows it can still read (`.dump`)."""
        aside = self.folder / f"{DAMAGED_PREFIX}{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        while aside.exists():  # set aside twice within a second
            aside = aside.with_name(f"{aside.name}+")
        aside.mkdir()
        for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", AUDIO_DIR):
            if (self.folder / name).exists():
                (self.folder / name).rename(aside / name)
        return aside

    def set_aside_logs(self) -> list[Path]:
        """The damaged logs set aside, oldest first."""
        return sorted(self.folder.glob(f"{DAMAGED_PREFIX}*"))

    def remove_set_aside(self, older_than: float | None = None) -> int:
        """Delete the damaged logs set aside (those set aside before `older_than`, unix time); returns
        how many."""
        removed = 0
        for aside in self.set_aside_logs():
            if older_than is None or aside.stat().st_mtime < older_than:
                shutil.rmtree(aside)
                removed += 1
        return removed

    def _cap_set_aside(self, logged: int) -> int:
        """Count the audio of the damaged logs set aside in `retention_bytes` with the `logged` bytes of
        this log's: they are older than any of its rows, so they go first, oldest first, while the
        total is over. Returns what is left of the set-aside audio, plus `logged`."""
        aside = [
            (path, sum(wav.stat().st_size for wav in (path / AUDIO_DIR).rglob("*.wav")))
            for path in self.set_aside_logs()
        ]
        total = logged + sum(size for _, size in aside)
        for path, size in aside:
            if total <= self.retention_bytes:
                break
            try:
                shutil.rmtree(path)
            except OSError as err:
                _LOGGER.warning("retention: could not delete a damaged log set aside: %s", err)
                break
            _LOGGER.info("retention: deleted the damaged log set aside in %s (audio over the cap)", path.name)
            total -= size
        return total

    def add(self, interaction: Interaction, audio: np.ndarray | None = None) -> int:
        """Log one interaction (and its 16 kHz audio unless audio logging is off); returns its row id."""
        rel: str | None = None
        size = 0
        if audio is not None and audio.size and self.log_audio and self._room_for_audio():
            day = datetime.fromtimestamp(interaction.created_at, UTC).strftime("%Y-%m-%d")
            rel = f"{AUDIO_DIR}/{day}/{uuid.uuid4().hex}.wav"
            target = self.folder / rel
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_wav(target, audio)
                size = target.stat().st_size
            except OSError as err:  # a full disk: the request is still logged, without its audio
                _LOGGER.warning("the audio of this request was not kept: %s", err)
                rel = None
        key = self.derived.key(as_stored(audio)) if rel and self.derived is not None else None
        i = interaction
        try:
            cursor = self.conn.execute(
                """INSERT INTO interactions (created_at, kind, client, satellite_id, device_id,
                    conversation_id, context, language, audio_path, audio_bytes, audio_key, duration_s,
                    path, transcript, intent, confidence, latency_ms, model_ms, projector_version, withheld)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    i.created_at, i.kind, i.client, i.satellite_id, i.device_id, i.conversation_id,
                    _json(i.context), i.language, rel, size, key, i.duration_s, i.path, i.transcript,
                    _json(i.intent.to_json() if i.intent else None), i.confidence, i.latency_ms,
                    i.model_ms, i.projector_version, _json(i.withheld.to_json() if i.withheld else None),
                ),
            )  # fmt: skip
        except BaseException:
            if rel:
                (self.folder / rel).unlink(missing_ok=True)
            raise
        row = int(cursor.lastrowid or 0)
        self._top_id = max(self._top_id, row)
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
            self.prune()
        return row

    def _room_for_audio(self) -> bool:
        """False while the disk has less than `min_free_bytes` free: the log keeps no recordings then, so
        that they do not fill the disk Home Assistant may run on too (it says so once, and once again
        when there is room)."""
        if not self.min_free_bytes:
            return True
        free = shutil.disk_usage(self.folder).free
        if (free < self.min_free_bytes) != self.disk_low:
            self.disk_low = not self.disk_low
            mb, need = free >> 20, self.min_free_bytes >> 20
            if self.disk_low:
                _LOGGER.warning(
                    "%d MB free on the disk: recordings are not kept until over %d MB are", mb, need
                )
            else:
                _LOGGER.info("%d MB free on the disk again: recordings are kept", mb)
        return not self.disk_low

    def link(self, row_id: int, context: dict[str, Any]) -> None:
        """Attach the conversation that used an utterance's result (Home Assistant's context ids)."""
        self.conn.execute(
            """UPDATE interactions SET conversation_id = COALESCE(?, conversation_id),
                   satellite_id = COALESCE(?, satellite_id), device_id = COALESCE(?, device_id),
                   context = COALESCE(context, ?)
               WHERE id = ?""",
            (
                _str(context.get("conversation_id")), _str(context.get("satellite_id")),
                _str(context.get("device_id")), _json(context), row_id,
            ),
        )  # fmt: skip

    def prune(self, now: float | None = None) -> int:
        """Apply retention (age first, then total audio size); returns the number of deletions. While a
        night runs it waits (`Derived.night_running`): the next `add` tries again."""
        if self.derived is not None and self.derived.night_running():
            return 0
        now = time.time() if now is None else now
        self._last_prune = time.monotonic()
        deleted = 0
        if self.retention_days:
            cutoff = now - self.retention_days * 86400.0
            deleted += self._delete(
                self.conn.execute(
                    "SELECT id, audio_path, audio_key FROM interactions WHERE created_at < ?", (cutoff,)
                ).fetchall()
            )
            try:
                if removed := self.remove_set_aside(older_than=cutoff):
                    _LOGGER.info("retention: deleted %s set aside", counted(removed, "damaged log"))
            except OSError as err:
                _LOGGER.warning("retention: could not delete a damaged log set aside: %s", err)
        if self.retention_bytes:
            total = self.conn.execute("SELECT COALESCE(SUM(audio_bytes), 0) FROM interactions").fetchone()[0]
            total = self._cap_set_aside(total)
            doomed: list[Doomed] = []
            rows = self.conn.execute(
                "SELECT id, audio_path, audio_key, audio_bytes FROM interactions WHERE audio_bytes > 0 "
                "ORDER BY created_at, id"
            ).fetchall()
            for row_id, rel, key, size in rows:
                if total <= self.retention_bytes:
                    break
                doomed.append((row_id, rel, key))
                total -= size
            deleted += self._delete(doomed)
        if deleted:
            _LOGGER.info("retention: deleted %s", counted(deleted, "old interaction"))
        return deleted

    def _delete(self, rows: list[Doomed]) -> int:
        """Delete these rows' audio files (and emptied day folders), then the rows (one transaction): on a
        full disk the files free the room the database may need to delete its rows. Then what was derived
        from the clips: a night that read a row before it went finds it missing when it ends (`adapt`)."""
        if not rows:
            return 0
        paths = [self.folder / rel for _, rel, _ in rows if rel]
        keys = self._clip_keys(rows) if self.derived is not None else set()
        for path in paths:
            path.unlink(missing_ok=True)
            if path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("DELETE FROM interactions WHERE id = ?", [(row[0],) for row in rows])
        # The write-ahead log still holds the pages as they were: copy it into the database, empty it.
        busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:  # another process is reading: the next checkpoint will do it
            _LOGGER.warning("the write-ahead log keeps the deleted rows until its next checkpoint")
        if self.derived is not None:
            try:
                self.derived.forget(keys, {row[0] for row in rows})
            except OSError as err:  # the rows and the audio are gone: say what is left, and go on
                _LOGGER.warning(
                    "could not delete what was derived from %s: %s", counted(len(rows), "row"), err
                )
        return len(rows)

    def _clip_keys(self, rows: list[Doomed]) -> set[str]:
        """The keys of the rows' clips: logged with the row, or read from a clip logged before the log
        kept them (one clip in memory at a time; one that does not read has none)."""
        assert self.derived is not None
        keys = {key for _, _, key in rows if key}
        for _, rel, key in rows:
            if rel and not key:
                with suppress(AudioError):
                    keys.add(self.derived.key(read_wav(self.folder / rel)))
        return keys

    def sweep(self) -> int:
        """Delete audio files no row names: a kill between writing a clip and logging its row, or inside
        an atomic write, leaves them. Only the server calls this, before it serves (a clip it is logging
        is named a moment after it is written). Returns how many."""
        audio = self.folder / AUDIO_DIR
        if not audio.is_dir():
            return 0
        rows = self.conn.execute("SELECT audio_path FROM interactions WHERE audio_path IS NOT NULL")
        named = {rel for (rel,) in rows}
        swept = 0
        try:
            for day in audio.iterdir():
                for path in day.iterdir() if day.is_dir() else ():
                    if path.is_file() and path.relative_to(self.folder).as_posix() not in named:
                        path.unlink()
                        swept += 1
                if day.is_dir() and not any(day.iterdir()):
                    day.rmdir()
        except OSError as err:  # the server serves on; the next start tries again
            _LOGGER.warning("could not sweep %s: %s", audio, err)
        if swept:
            _LOGGER.info("deleted %s no interaction names (left by a crash)", counted(swept, "audio file"))
        return swept

    def correct(self, row_id: int, correction: dict[str, Any] | None) -> bool:
        """Store (or with None, remove) a validated correction; False when there is no such interaction.
        A corrected transcript that changes or goes takes what was kept of its words with it
        (`Derived.forget_words`)."""
        row = self.conn.execute(
            "SELECT correction, audio_path, audio_key FROM interactions WHERE id = ?", (row_id,)
        ).fetchone()
        if row is None or not set_correction(self.conn, row_id, correction):
            return False
        before = (parse_correction(row[0]) or {}).get("text")
        if before and before != (correction or {}).get("text") and self.derived is not None:
            try:
                self.derived.forget_words(self._clip_keys([(row_id, row[1], row[2])]))
            except OSError as err:  # the correction is stored: say what is left, and go on
                _LOGGER.warning("could not forget the words interaction %d was corrected to: %s", row_id, err)
        return True

    def delete(self, ids: list[int]) -> int:
        """Delete these interactions with their audio files; returns how many there were."""
        rows: list[Doomed] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.conn.execute(
                f"SELECT id, audio_path, audio_key FROM interactions WHERE id IN ({marks})", chunk
            ).fetchall()
        return self._delete(rows)

    def close(self) -> None:
        """Close the database (SQLite checkpoints the WAL into the main file)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ async API (the server's)
    async def _call(self, fn: Callable[..., T], *args: object, again: bool = False) -> T:
        run = partial(self._mending, fn, args, again)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def _mending(self, fn: Callable[..., T], args: tuple[object, ...], again: bool) -> T:
        """`fn(*args)`; if SQLite finds the log damaged while the server runs (a bad block on an SD card),
        the log is set aside and a new one started, and the call fails with SQLite's error, or, when
        `again` (logging an utterance, so that it is kept), runs once more on the new log. Others may
        hold the old connection or name the old log's rows."""
        try:
            return fn(*args)
        except sqlite3.DatabaseError as err:
            if self._conn is None or not _damage(err):
                raise
            if time.monotonic() - self._started_over < START_OVER_EVERY_S:
                _LOGGER.error(
                    "the interaction log %s is damaged again (%s) within %d minutes of starting over: is "
                    "the disk failing? It is not set aside again until then",
                    self.db_path, err, START_OVER_EVERY_S // 60,
                )  # fmt: skip
                raise
            self.start_over(StoreDamaged(f"the interaction log {self.db_path} is damaged: {err}"))
            if not again:
                raise
        return fn(*args)

    async def async_add(self, interaction: Interaction, audio: np.ndarray | None = None) -> int:
        """`add` on the store's thread. A failure (a card remounted read-only, a full disk) is logged, with
        its traceback the first time, and kept in `write_error` for the dashboard until an utterance is
        logged again: reads still work then, so the log would look fine while it keeps nothing."""
        try:
            row = await self._call(self.add, interaction, audio, again=True)
        except Exception as err:
            _LOGGER.error("could not log the interaction: %s", err, exc_info=self.write_error is None)
            self.write_error = str(err) or type(err).__name__
            raise
        if self.write_error is not None:
            _LOGGER.info("the interaction log keeps utterances again")
            self.write_error = None
        return row

    async def async_link(self, row_id: int, context: dict[str, Any]) -> None:
        await self._call(self.link, row_id, context)

    async def async_call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the store's thread (for readers and writers of `conn`, e.g. `web.py`)."""
        return await self._call(fn, *args)

    async def async_close(self) -> None:
        """Finish every queued write, close the database and stop the store's thread."""
        await self._call(self.close)
        await asyncio.to_thread(self._executor.shutdown, True)


def _top_id(conn: sqlite3.Connection) -> int:
    """The highest interaction id this log has given (0 if none, or no row was ever logged)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'interactions'").fetchone()
    return int(row[0]) if row else 0


def _damage(err: sqlite3.Error) -> bool:
    """Whether SQLite's error says the database file is damaged or not a database."""
    return err.sqlite_errorname in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)
