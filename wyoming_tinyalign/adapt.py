"""`wyoming-tinyalign adapt`: the nightly per-household adaptation job; `wyoming-tinyalign rollback`.

One run, in its own low-priority process (`nice` 10, so the server beside it answers first; torch threads
on every core unless `--threads` says otherwise):

1. takes a lock (one run at a time) and records itself in the log's `adaptations` table;
2. runs the teacher (Whisper's own decoder) on logged utterances that have none yet, then labels every
   logged utterance it can (`labels.py`: correction > teacher > confirmed outcome);
3. skips, saying why, when the labels have not changed since the last run (hash) or fewer than
   `--min-new` are new (`--now` runs anyway);
4. splits the labelled utterances into train and held-out by a hash of the interaction id (1 in
   `--heldout-every`), so a row never changes sides from one night to the next;
5. fine-tunes the served projector with the objective it was aligned with (EmbedLink for a projector
   the nights grew from nothing; `train.train`, encoder features cached under `DATA/cache/features`) on
   the household's train split plus a replay sample of the base households' speech (rendered once into
   `DATA/bootstrap`, so it does not forget them), within the time budget; and, in half of that time,
   Whisper's decoder adapters (`model/decoder_adapter.py`, `decoder_train.py`; from the served ones) on
   the same utterances' transcripts and a larger replay sample (learnt as the served decoder heard it),
   with a memory of the household's transcripts read through them (`model/decoder_memory.py`: the
   held-out ones too, left out while the night judges the cascade, the served one's included);
6. validates the candidate and the served projector on the household's held-out set and on a general
   held-out set of base-household speech (intent accuracy, WER, and that objective's loss), and the
   cascade on the household's held-out set (for the day-0 rule of `--path auto`), and, when a household
   version is served, the bundle's own projector on the general set; the cascade with the new decoder
   adapters against the served cascade on both sets (and, when adapters are served, Whisper's decoder as
   built on the general set);
7. promotes the candidate only when it is better for the household by more than chance (`gate.py`: a
   sign test over the held-out utterances that changed) and not worse elsewhere beyond `--tolerance`,
   than the served projector and than the bundle's own (so small losses do not add up night after
   night); the decoder adapters by the same rule on the cascade's answers. The version holds each part
   the night made where its gate passed, the served part where not (when neither passed: the night's
   candidates). It becomes a new numbered version file either way (`versions.py`); a promoted one then
   gets the pointer, a rejected one is kept on record with the reason (the household may serve it
   anyway). Unless recordings it was trained or judged on were deleted while it ran: then it goes,
   unkept.

Nothing the server reads is written before step 7, so a kill at any moment leaves it serving a complete
version. The report (data sizes, label sources, before/after metrics, loss curve, duration, peak memory)
goes to the `adaptations` table and, as one JSON object, to stdout.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .assistant import load_context_file
from .audio import TARGET_RATE, AudioError, read_wav
from .decoder_train import DecoderTrainConfig, decoder_examples, remember, train_decoder_adapter
from .evaluate import score_answers
from .files import write_atomic
from .gate import MIN_JUDGED, decide, paired_changes, path_auto
from .hass import HOUSEHOLD_FILE
from .households import Household, context_text, load_households
from .intents import Answer, Intent
from .labels import (
    Label,
    LabelSettings,
    compute_labels,
    parse_correction,
    record_label_sources,
    rows_needing_teacher,
    set_teacher,
)
from .manifest import Utterance, read_manifest, write_manifest
from .memory import return_freed_memory
from .model.bundle import (
    BundleConfig,
    ProjectorInfo,
    load_bundle_config,
    load_projector,
)
from .model.decoder_adapter import Adapter, AdapterConfig, AdapterError, ShapedAdapter, adapter_key
from .model.decoder_memory import as_judged
from .model.projector import Projector, weights_key
from .model.prompt import answer_ids
from .model.speechllm import DECODING_VERSION, SpeechLLM
from .models import add_dtype_arg, inference_dtype, projector_version, resolve_model
from .store import DB_FILE, InteractionStore, StoreError
from .synth import render_once
from .train import (
    Example,
    FeatureCache,
    LossFn,
    TrainConfig,
    TrainResult,
    add_micro_batch_arg,
    embedlink_loss,
    objective_loss,
    train,
    utterance_seconds,
    val_loss,
)
from .versions import BASE, VersionError, Versions, auto_path, check_fits, recorded_model
from .words import counted

_LOGGER = logging.getLogger(__name__)

ADAPT_DIR = "adapt"
STATE_FILE = "state.json"
PREDICTIONS_DIR = "predictions"  # under ADAPT_DIR: `Predictions` files
FEATURES_DIR = Path("cache") / "features"  # under the data dir: the encoder feature cache by default
CONTEXT_FILE = "context.txt"  # the household context the server used, written when it starts a job
LOCK_FILE = "lock"
# How long a run waits for the lock: a delete or the server's clean-up after a kill holds it for moments
# (`NightData.forget`, `clean_up_killed_run`), another run for its whole length.
LOCK_WAIT_S = 5.0
# Under ADAPT_DIR, what one run trains from and into: gone when it ends (the manifests hold the
# household's words, which a delete must not leave behind) and when the next starts (after a kill).
SCRATCH_DIRS = ("manifests", "candidate")
HOUSEHOLD = "household"
REPLAY_SEED, GENERAL_SEED = 1000, 1001
MIN_EVAL_ITEMS = 8
FINISH_S = 5.0  # what a night needs after its last validation (the version written, caches pruned)
CAP_MARGIN = 8  # validation answers may run this many tokens past the reference answer
# The most epochs a night trains the projector (patience ends most nights sooner): its learning rate
# decays over them, not over the clock, so that a night the budget does not cut is the same every time.
PROJECTOR_EPOCHS = 40
EARLY_STOP_EVERY = 6  # 1 in this many training utterances (and as many replayed ones) stops training early
# ... but at most this many: each of the training's validations runs the LLM over them (about 0.5 s
# apiece at real size, 2 cores), and at 561 household utterances two took about 190 s of a 387 s training.
EARLY_STOP_MAX = 32
# Whisper's decoder adapters get this share of the training time (the projector the rest).
DECODER_SHARE = 0.5
# Replayed base-household utterances per household one for the decoder (benchmarks/decoder_adaptation.py:
# 400 for 100 held the other voices over 20 epochs, 100 did not).
DECODER_REPLAY = 4
# Where the decoder adapters train, the projector trains only if its share of the training time holds at
# least this many passes over its utterances; otherwise the adapters get its time (`projector_skip`).
PROJECTOR_MIN_PASSES = 1.0
# Where the cascade pads to 30 s, the decoder's training features in memory: at most this many MB (at
# whisper-base, 330 clips' features (500 MB, computed) took a real-size night to 3288 MiB; RESULTS.md).
DECODER_PADDED_MB = 160


@dataclass
class AdaptOptions:
    """Everything that decides a run (`adapt` flags)."""

    data_dir: Path
    model: str | None = None  # bundle folder / dev / preset:NAME; default: the one `serve` recorded
    now: bool = False  # run even when the labels are unchanged or too few are new
    budget_minutes: float = 10.0
    min_new: int = 20
    keep: int = 5
    heldout_every: int = 5
    heldout_max: int = 100
    train_max: int = 600
    tolerance: float = 0.02
    decide_on: str = "answers"  # or "loss" (development models whose answers mean nothing yet)
    teacher_min_confidence: float = -0.5
    teacher_max: int = 500
    outcome_window_s: float = 120.0
    replay_n: int = 400
    general_n: int = 60
    lr: float = 3e-4
    # Whisper's decoder adapters (`decoder_train.DecoderTrainConfig`; epochs 0: the night trains the
    # projector alone)
    decoder_epochs: int = DecoderTrainConfig.epochs
    decoder_lr: float = DecoderTrainConfig.lr
    decoder_distill: float = DecoderTrainConfig.distill
    batch: int = 16
    # Utterances per forward/backward pass: at Qwen2.5-0.5B's size a step peaks ~0.36 GB over the model one
    # at a time, ~0.63 GB two at a time (benchmarks/RESULTS.md); the 3 GB budget takes one.
    micro_batch: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # the backbones' precision, as the server runs them (models.inference_dtype)
    context_file: Path | None = None
    bootstrap_dir: Path | None = None
    cache_dir: Path | None = None

    @property
    def work(self) -> Path:
        return self.data_dir / ADAPT_DIR


@dataclass
class DecoderNight:
    """What a night made of Whisper's decoder adapters: them, the cascade with them, and the verdict."""

    adapter: Adapter  # with the memory of every transcript, the held-out ones too
    config: AdapterConfig
    promote: bool
    reason: str
    before: dict[str, dict]  # the served cascade's figures on the same sets
    after: dict[str, dict]  # the cascade's figures with them, per set
    items: list[Item]  # the household's utterances they were judged on
    answers: list[Answer]  # the cascade's with them, on those
    report: dict[str, Any]


@dataclass
class Serving:
    """What answers the household when the night starts: what it fine-tunes and is judged against."""

    name: str  # the version (BASE: the bundle's own projector)
    projector: Projector | None  # None: the bundle has none (the night grows a first one)
    info: ProjectorInfo | None
    path: Path | None  # the projector's file, where training starts from
    adapter: ShapedAdapter | None  # Whisper's decoder adapters
    shipped: Projector | None = None  # the bundle's own, where a household version is served

    def objective(self) -> tuple[str, float]:
        """The loss the projector was aligned with (and EmbedLink's weight in it), which the night
        fine-tunes with: EmbedLink pulls a generatively aligned projector off what the LLM reads
        (DESIGN.md); a first projector is grown with EmbedLink."""
        return (self.info.objective, self.info.embedlink_weight) if self.info else ("embedlink", 1.0)


@dataclass
class NightSets:
    """The speech a night learns from and is judged on."""

    train: list[tuple[Label, np.ndarray]]  # the household's labelled utterances it learns from
    held: list[tuple[Label, np.ndarray]]  # the household's held out (the typed first: `split_labels`)
    replay_all: list[Utterance]  # base-household speech rendered for replay
    replay: list[Utterance]  # the projector's sample of it
    general: list[Utterance]  # base-household speech held out
    held_items: list[Item]  # `held` and `general` ready to answer, cut to the budget (`_validate_served`)
    general_items: list[Item]


@dataclass
class Before:
    """What is served, on the night's held-out sets before it trains."""

    figures: dict[str, Any]  # the projector's, per set (`Job._evaluate`)
    answers: dict[str, list[Answer]] | None  # its answers, per set (None: there is no projector)
    shipped_answers: dict[str, list[Answer]] | None  # the bundle's own projector's on the general set
    cascade: dict[str, list[Answer]]  # the cascade's answers, per set
    caches: list[Predictions | None]  # the answers kept for the next nights (`Job._prune`)
    per_item: float  # seconds of one validation answer

    @property
    def loss_s(self) -> float:
        """Seconds its held-out losses took (never cached: the candidate's cost as much)."""
        return sum(self.figures[name].get("loss_s", 0.0) for name in ("household", "general"))


@dataclass
class ProjectorNight:
    """What a night made of the projector, and the verdict: its candidate (None where it trained none,
    or training kept the served one) and the candidate's figures (the served one's where none)."""

    promote: bool
    reason: str
    after: dict[str, Any]
    candidate: Projector | None = None
    info: ProjectorInfo | None = None
    answers: dict[str, list[Answer]] | None = None
    skipped: str | None = None  # why it was not trained


class Skip(Exception):
    """The run has nothing to do; the message says why."""


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class Item:
    """One held-out utterance: its audio, cached encoder features, reference and household context."""

    key: str  # the household's: its audio's digest (as `FeatureCache.key`); the general set's: g<index>
    audio: np.ndarray
    features: torch.Tensor
    utterance: Utterance
    context: str


class Predictions:
    """What one projector (or the cascade) answered on held-out items, kept across nights: its answers do
    not change (until the decoding does: `DECODING_VERSION`), so each night only new items (and a new
    candidate) cost model runs."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"{key}-d{DECODING_VERSION}.json"
        try:
            self.data: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.used: set[str] = set()

    def get(self, key: str) -> Answer | None:
        hit = self.data.get(key)
        if hit is None:
            return None
        self.used.add(key)
        return hit[0], Intent.from_json(hit[1]) if hit[1] else None

    def put(self, key: str, transcript: str, intent: Intent | None) -> None:
        self.data[key] = [transcript, intent.to_json() if intent else None]
        self.used.add(key)

    def save(self) -> None:
        """Keep what this night used (answers for deleted or dropped items go)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = {k: v for k, v in self.data.items() if k in self.used}
        write_atomic(self.path, json.dumps(kept).encode())


def answer_cap(model: SpeechLLM, utterance: Utterance) -> int:
    """Tokens worth generating for an utterance: the reference answer's length plus a margin. A longer
    answer cannot be right, and a model that never stops (random weights) must not cost the full cap."""
    return len(answer_ids(model.tokenizer, utterance.text, utterance.intent)) + CAP_MARGIN


def _refs(items: list[Item]) -> list[Utterance]:
    return [item.utterance for item in items]


def answer_key(item: Item) -> str:
    """An answer's key in `Predictions`: the utterance, its reference and its household context."""
    return f"{item.key}/{_digest(item.context, item.utterance.text, _intent_text(item.utterance.intent))}"


def answers(model: SpeechLLM, items: list[Item], path: str, cache: Predictions) -> list[Answer]:
    """Answers along `aligned` (the model's current projector) or `cascade`, from the cache when known.
    The cascade's missing answers come from a second load of Whisper (`SpeechLLM.separate_decoder`)."""
    keys = [answer_key(item) for item in items]
    got = [cache.get(key) for key in keys]
    missing = [i for i, hit in enumerate(got) if hit is None]
    if missing:
        with model.separate_decoder() if path == "cascade" else nullcontext():
            for i in missing:
                item, cap = items[i], answer_cap(model, items[i].utterance)
                if path == "cascade":
                    result = model.run(item.audio, "cascade", item.context, max_new_tokens=cap)
                else:
                    result = model.run_features(item.features, "aligned", item.context, max_new_tokens=cap)
                got[i] = (result.transcript, result.intent)
                cache.put(keys[i], *got[i])
    return got  # type: ignore[return-value]  # every None was filled


# ------------------------------------------------------------------------------------------------ job
@contextmanager
def job_lock(work: Path, wait_s: float = 0.0) -> Iterator[bool]:
    """Hold the adaptation lock of a work folder for the block if it can be had within `wait_s` (True);
    False: another holds it."""
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with open(work / LOCK_FILE, "a+") as lock:
        while not (held := _try_lock(lock)) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield held


def _try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def fail_running(conn: sqlite3.Connection, reason: str) -> None:
    """Record the runs still marked running as failed (their job is gone)."""
    conn.execute(
        "UPDATE adaptations SET status = 'failed', finished_at = ?, reason = ? WHERE status = 'running'",
        (time.time(), reason),
    )


def remove_scratch(work: Path) -> None:
    """Delete a run's scratch folders (`SCRATCH_DIRS`); the caller holds the lock."""
    for name in SCRATCH_DIRS:
        shutil.rmtree(work / name, ignore_errors=True)


def forget_label_digests(work: Path, ids: set[int]) -> None:
    """Drop these rows from the last run's label digests (`STATE_FILE`): a digest of a deleted label's
    words must not outlive it. The caller holds the lock."""
    path = work / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    labels = state.get("labels", {})
    kept = {k: v for k, v in labels.items() if int(k) not in ids}
    if len(kept) < len(labels):
        write_atomic(path, json.dumps({**state, "labels": kept}).encode())


def clean_up_killed_run(data_dir: Path, conn: sqlite3.Connection, reason: str) -> None:
    """After a run was killed (no run holds the lock now): its row failed with `reason`, and its scratch
    (the household's words in the manifests) deleted, as the run itself would have on its way out."""
    with job_lock(data_dir / ADAPT_DIR) as free:
        if free:
            remove_scratch(data_dir / ADAPT_DIR)
            fail_running(conn, reason)


def run_job(opts: AdaptOptions, started: float | None = None) -> dict[str, Any]:
    """One adaptation run; returns its report (also stored in the `adaptations` table). Its time budget
    counts from `started` (a `time.monotonic()`; default: now)."""
    with job_lock(opts.work, LOCK_WAIT_S) as free:
        if not free:
            return {"status": "busy", "reason": "another adaptation is running"}
        if not (opts.data_dir / "log" / DB_FILE).is_file():
            return {
                "status": "skipped",
                "reason": "no interaction log here (logging off, or nothing logged yet)",
            }
        store = InteractionStore(opts.data_dir / "log")
        store.open()
        opened = store.db_path.stat().st_ino
        try:
            report = Job(opts, store.conn, started).run()
        finally:
            store.close()
        with suppress(FileNotFoundError):  # a log gone altogether has no page to list the run
            if store.db_path.stat().st_ino != opened:
                record_in_new_log(store.folder, report)
        return report


def start_row(conn: sqlite3.Connection, report: dict[str, Any]) -> int:
    """A run's row in the `adaptations` table, while it runs; returns its id."""
    return conn.execute(
        "INSERT INTO adaptations (started_at, status, serving_version) VALUES (?, 'running', ?)",
        (report["started_at"], report["serving_version"]),
    ).lastrowid


def finish_row(conn: sqlite3.Connection, row: int, report: dict[str, Any]) -> None:
    """Record the finished run's outcome and report in its row."""
    conn.execute(
        "UPDATE adaptations SET finished_at = ?, status = ?, reason = ?, version = ?, data_hash = ?, "
        "report = ? WHERE id = ?",
        (
            report["finished_at"], report["status"], report.get("reason"), report.get("version"),
            report.get("data_hash"), json.dumps(report), row,
        ),
    )  # fmt: skip


def record_in_new_log(folder: Path, report: dict[str, Any]) -> None:
    """The server set the log aside as damaged while this run ran (`store.start_over`), and the run's
    row went with it: record the finished run in the log there now too, so the household's page lists
    it (a version it promoted is served)."""
    store = InteractionStore(folder)
    try:
        store.open()
        try:
            report["run"] = start_row(store.conn, report)  # this log's number for it
            finish_row(store.conn, report["run"], report)
        finally:
            store.close()
    except (OSError, StoreError, sqlite3.Error) as err:
        _LOGGER.error("the log was set aside while this run ran, and the new one cannot take it: %s", err)
        return
    _LOGGER.warning("the log was set aside while this run ran: the run is recorded in the new one too")


class Job:
    """One run against an open interaction log (see the module docstring for the steps)."""

    def __init__(self, opts: AdaptOptions, conn: sqlite3.Connection, started: float | None = None) -> None:
        self.opts, self.conn = opts, conn
        self.start = time.monotonic() if started is None else started
        self.budget_s = max(0.0, opts.budget_minutes * 60)
        self.versions = Versions(opts.data_dir)
        self.model: SpeechLLM | None = None
        self.bundle: Path | None = None
        self.bundle_cfg: BundleConfig | None = None
        self.report: dict[str, Any] = {"status": "running", "started_at": time.time()}
        self.loss_fn: LossFn = embedlink_loss  # the held-out loss: the served projector's objective
        self.clips: dict[int, str] = {}  # the labelled interactions read, by id: their clip's key
        self.remembered: dict[int, str] = {}  # the corrected transcripts the memory keeps, by id
        self.sample_key = ""  # seeds the night's replay samples: the labels alone (set in `_run`)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    # ------------------------------------------------------------------------------------ bookkeeping
    def run(self) -> dict[str, Any]:
        fail_running(self.conn, "interrupted (the job was killed, or the machine stopped)")
        self.versions.clean()
        remove_scratch(self.opts.work)  # a killed run's (a half-trained candidate must not be resumed)
        try:
            self.report["serving_version"] = self.versions.current()
        except VersionError as err:
            self.report["serving_version"] = None
            _LOGGER.error("the version pointer is unreadable: %s", err)
        row = self.report["run"] = start_row(self.conn, self.report)
        try:
            self._run()
        except Skip as skip:
            self.report.update(status="skipped", reason=str(skip))
        except Exception as err:  # recorded, then reported as a failure
            _LOGGER.exception("adaptation failed")
            self.report.update(status="failed", reason=f"{type(err).__name__}: {err}")
        try:
            self._forget_deleted()
            self._forget_recorrected()
        except (OSError, sqlite3.Error) as err:
            _LOGGER.error("could not forget the clips deleted or corrected again while this run ran: %s", err)
        remove_scratch(self.opts.work)
        self.report["finished_at"] = time.time()
        self.report["duration_s"] = round(self.elapsed(), 1)
        self.report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.report["threads"] = torch.get_num_threads()
        if self.opts.device.startswith("cuda") and torch.cuda.is_initialized():
            self.report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.opts.device) / 2**20, 1)
        finish_row(self.conn, row, self.report)
        _LOGGER.info("adaptation %s: %s", self.report["status"], self.report.get("reason"))
        return self.report

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.opts.work / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, data_hash: str, digests: dict[str, str]) -> None:
        state = {"data_hash": data_hash, "labels": digests, "at": time.time()}
        write_atomic(self.opts.work / STATE_FILE, json.dumps(state).encode())

    # ---------------------------------------------------------------------------------------- model
    def _resolve_bundle(self) -> None:
        if self.bundle is not None:
            return
        if self.opts.model:
            self.bundle = resolve_model(self.opts.model, self.opts.data_dir).folder
        else:
            self.bundle = recorded_model(self.opts.data_dir)
        self.bundle_cfg = load_bundle_config(self.bundle)

    def _load_model(self) -> SpeechLLM:
        if self.model is None:
            self._resolve_bundle()
            assert self.bundle is not None
            dtype = inference_dtype(self.opts.device, self.opts.dtype)
            _LOGGER.info("loading %s (%s)", self.bundle, str(dtype).removeprefix("torch."))
            self.model = SpeechLLM.load(self.bundle, device=self.opts.device, dtype=dtype)
            self.report["dtype"] = str(dtype).removeprefix("torch.")
            self._serve_decoder_adapter(self.model)
        return self.model

    def _serve_decoder_adapter(self, model: SpeechLLM) -> None:
        """The served version's Whisper decoder adapters, in the model's cascade (and so the teacher's),
        with its memory as its night judged it: without the clips held out to judge nights, which
        judge this one too (`decoder_memory.as_judged`)."""
        name = self.report.get("serving_version") or BASE
        if name == BASE:
            return
        try:
            if (adapter := self.versions.adapter(name)) is not None:
                model.set_decoder_adapter(as_judged(adapter[0]), adapter[1])
        except (VersionError, AdapterError) as err:
            _LOGGER.error(
                "the decoder adapters of %s cannot be used (%s); the cascade runs without", name, err
            )

    def _serving(self, model: SpeechLLM) -> Serving:
        """What is served: the version (checked against the bundle), or the bundle's own projector."""
        assert self.bundle is not None and self.bundle_cfg is not None
        name = self.report.get("serving_version") or BASE
        adapter = model.decoder_adapter
        if name != BASE:
            try:
                projector, info = self.versions.load(name, self.opts.device)
                check_fits(info, self.bundle_cfg, model.encoder.dim, model.llm.config.hidden_size)
                path = self.versions.path(name)
            except VersionError as err:
                _LOGGER.error(
                    "version %s cannot be used (%s); starting from the bundle's projector", name, err
                )
            else:
                shipped = self._shipped_projector()
                return Serving(name, projector, info, path, adapter, shipped[0] if shipped else None)
        shipped = self._shipped_projector()
        return Serving(BASE, *shipped, adapter) if shipped else Serving(BASE, None, None, None, adapter)

    def _shipped_projector(self) -> tuple[Projector, ProjectorInfo, Path] | None:
        """The bundle's own projector (None: the bundle has none)."""
        assert self.bundle is not None and self.bundle_cfg is not None
        if self.bundle_cfg.projector and (self.bundle / self.bundle_cfg.projector).is_file():
            path = self.bundle / self.bundle_cfg.projector
            return (*load_projector(path, self.opts.device), path)
        return None

    # ---------------------------------------------------------------------------------------- steps
    def _teacher(self) -> int:
        """Whisper's transcript of logged utterances that have none yet (within a share of the budget)."""
        rows = []
        for row in rows_needing_teacher(self.conn, self.opts.teacher_max):
            if row["path"] == "cascade" and row["confidence"] is not None:  # the cascade *is* the teacher
                set_teacher(self.conn, row["id"], row["transcript"] or "", float(row["confidence"]))
            else:
                rows.append(row)
        if not rows:
            return 0
        done = 0
        deadline = self.start + 0.3 * self.budget_s
        model, context = self._load_model(), self._context()
        with model.separate_decoder():
            for row in rows:
                if time.monotonic() > deadline and done:
                    _LOGGER.info("teacher: stopping for the time budget, %d left for later", len(rows) - done)
                    break
                try:
                    audio = read_wav(self.opts.data_dir / "log" / row["audio_path"])
                except AudioError as err:
                    _LOGGER.warning("teacher: skipping interaction %s: %s", row["id"], err)
                    continue
                result = model.run(audio, "cascade", context, row["language"], with_intent=False)
                confidence = -99.0 if result.confidence is None else result.confidence  # silence
                set_teacher(self.conn, row["id"], result.transcript, confidence)
                done += 1
        return done

    def _items(self, labels: list[Label]) -> list[tuple[Label, np.ndarray]]:
        out = []
        for label in labels:
            try:
                audio = read_wav(self.opts.data_dir / "log" / label.audio_path)
            except AudioError as err:
                _LOGGER.warning("skipping interaction %d: %s", label.id, err)
                continue
            out.append((label, audio))
            self.clips[label.id] = FeatureCache.key(audio)
        return out

    def _forget_deleted(self) -> None:
        """Forget what this run derived from rows deleted while it ran: the server forgot it at once
        (`store.Derived`), but this run may have written their clips' features or answers, or their
        label digests, since."""
        gone_ids = self._gone(set(self.clips) | {int(k) for k in self._state().get("labels", {})})
        forget_label_digests(self.opts.work, gone_ids)
        gone = {key for row_id, key in self.clips.items() if row_id in gone_ids}
        if gone:
            NightData(self.opts.data_dir).forget_clips(gone)  # the label digests went above
            self.versions.forget_memory(gone)
            self.report.setdefault("data", {})["deleted_while_running"] = len(gone)
            _LOGGER.info(
                "forgot what this run derived from %s deleted while it ran", counted(len(gone), "clip")
            )

    def _forget_recorrected(self) -> None:
        """Take out of the versions' memories the clips whose corrected transcript changed or went while
        this run ran: the memory it built keeps the words as they were (the server forgot them in the
        memory it serves at once, `store.InteractionStore.correct`)."""
        rows = self.conn.execute(
            "SELECT id, correction FROM interactions WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(self.remembered)),),
        )
        changed = {
            self.clips[row_id]
            for row_id, raw in rows
            if (parse_correction(raw) or {}).get("text") != self.remembered[row_id]
        }
        if changed:
            self.versions.forget_memory(changed)
            _LOGGER.info(
                "forgot the remembered words of %s corrected again while this run ran",
                counted(len(changed), "clip"),
            )

    def _gone(self, ids: set[int]) -> set[int]:
        """Those of these interaction rows that are no longer in the log (deleted)."""
        found = self.conn.execute(
            "SELECT id FROM interactions WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(ids)),),
        )
        return ids - {row_id for (row_id,) in found}

    def _bootstrap(self, name: str, n: int, seed: int, households: list[Household]) -> Path:
        root = self.opts.bootstrap_dir or self.opts.data_dir / "bootstrap"
        return bootstrap_speech(root, name, n, seed, households)

    def _replay_households(self, base: list[Household]) -> list[Household]:
        """The base households, plus this home's own area and device names (from Home Assistant, kept in
        `DATA/household.json`) spoken by the base voices, so replay also rehearses the family's names."""
        path = self.opts.data_dir / HOUSEHOLD_FILE
        try:
            own = load_households(path) if path.is_file() else []
        except (OSError, ValueError) as err:
            _LOGGER.warning("not using %s for replay speech: %s", path, err)
            own = []
        voices = [speaker for house in base for speaker in house.speakers]
        return base + [replace(house, speakers=voices) for house in own if house.devices]

    def _labels(self) -> tuple[list[Label], list[Label], dict[str, str], str]:
        """The night's labels (the teacher first, for utterances that have no teacher transcript yet),
        counted into the report; a Skip when they have not changed or are too few. Returns the held-out
        and trainable labels, each label's digest and the data hash (what the next night compares)."""
        opts = self.opts
        self.report["data"] = data = {"teacher_runs": self._teacher()}
        settings = LabelSettings(opts.teacher_min_confidence, opts.outcome_window_s)
        labels, counts = compute_labels(self.conn, settings)
        record_label_sources(self.conn, labels)
        data["labelled"] = len(labels)
        data["sources"] = {s: counts.get(s, 0) for s in ("correction", "teacher", "outcome")}
        data["outcomes"] = {
            k.removeprefix("outcome_"): v for k, v in counts.items() if k.startswith("outcome_")
        }
        self._resolve_bundle()
        assert self.bundle is not None
        digests = {str(lab.id): _digest(lab.text, _intent_text(lab.intent)) for lab in labels}
        labelled = sorted(f"{k}:{v}" for k, v in digests.items())
        model_id = (str(self.bundle.resolve()), projector_version(self.bundle) or "")
        data_hash = _digest(*model_id, str(opts.heldout_every), *labelled)
        self.report["data_hash"] = data_hash
        # The replay samples are drawn from the labels alone: the same log draws the same ones wherever the
        # model lies (the data hash holds its folder, so that a model moved or changed runs again).
        self.sample_key = _digest(*labelled)
        state = self._state()
        new = sum(state.get("labels", {}).get(k) != v for k, v in digests.items())
        data["new"] = new
        if not opts.now:
            if state.get("data_hash") == data_hash:
                raise Skip("the labelled data has not changed since the last run")
            if new < opts.min_new:
                raise Skip(
                    f"only {counted(new, 'new label')}; at least {opts.min_new} are needed (--min-new)"
                )
        held, trainable = split_labels(labels, opts.heldout_every, opts.heldout_max, opts.train_max)
        if not trainable or not held:
            raise Skip(
                f"not enough labelled utterances: {len(trainable)} to train on and {len(held)} held out "
                f"(1 in {opts.heldout_every} is held out)"
            )
        data["heldout_sources"] = {
            s: sum(lab.source == s for lab in held) for s in ("correction", "teacher", "outcome")
        }
        return held, trainable, digests, data_hash

    def _run(self) -> None:
        opts, report = self.opts, self.report
        held, trainable, digests, data_hash = self._labels()
        model = self._load_model()
        self._stage("model loaded")
        serving = self._serving(model)
        self.loss_fn = objective_loss(*serving.objective())
        cache = FeatureCache(opts.cache_dir or opts.data_dir / FEATURES_DIR, model.encoder, opts.batch)
        sets = self._night_sets(cache, trainable, held)

        # Whisper's decoder learns only words the household typed: the teacher's are Whisper's own (the
        # served cascade's, as are most confirmed outcomes'), and adapters judged against the words of
        # the decoder that wrote them only come out worse (every household's teacher night did).
        typed_train = [(lab, a) for lab, a in sets.train if lab.typed]
        n_typed = sum(lab.typed for lab, _ in sets.held)  # (the first held out: `split_labels`)
        decoder_skip = None
        if opts.decoder_epochs and (not typed_train or n_typed < MIN_JUDGED):
            decoder_skip = (  # (why the adapters were not trained)
                f"it learns from transcripts the household corrected, and there are {len(typed_train)} "
                f"to learn from and {n_typed} held out to judge by (it needs at least 1 and {MIN_JUDGED})"
            )
            report["decoder"] = {"skipped": decoder_skip, "promoted": False}
        train_decoder = bool(opts.decoder_epochs) and decoder_skip is None

        before = self._validate_served(model, serving, cache, sets, n_typed * train_decoder)
        n_typed = min(n_typed, len(sets.held_items))  # (never cut below MIN_JUDGED: at least 8 are kept)

        # Train within what is left of the budget (keeping time for validating the candidate).
        n_answers = len(sets.held_items) + len(sets.general_items)
        _, candidate_eval_s = validation_seconds(
            before.per_item,
            len(sets.held_items),
            len(sets.general_items),
            n_typed * train_decoder,
            serving.adapter is not None,
        )
        candidate_eval_s += before.loss_s + FINISH_S
        # At least a quarter of the budget: a first night that spent it rendering replay speech and
        # computing features should still learn something (the budget is a target, not a wall).
        train_s = max(0.25 * self.budget_s, self.budget_s - self.elapsed() - candidate_eval_s)
        decoder_s = DECODER_SHARE * train_s if train_decoder else 0.0
        train_s -= decoder_s
        projector = self._projector_night(model, serving, cache, sets, before, train_s, train_decoder)
        report["after"] = projector.after
        if projector.skipped:  # the adapters get its time, and its candidate's validation's
            decoder_s += train_s + before.per_item * n_answers + before.loss_s
        night = None
        if train_decoder:
            judged_sets = {"household": sets.held_items[:n_typed], "general": sets.general_items}
            served_answers = {
                "household": before.cascade["household"][:n_typed],
                "general": before.cascade["general"],
            }
            try:
                typed_held = [(lab, a) for lab, a in sets.held if lab.typed]
                night = self._decoder_night(
                    model, typed_train, typed_held, sets.replay_all, judged_sets, served_answers, decoder_s,
                    cache,
                )  # fmt: skip
                report["decoder"] = night.report
            except Exception as err:  # whatever stops the adapters must not cost the night its projector
                _LOGGER.exception("training Whisper's decoder adapters failed")
                report["decoder"] = {"error": f"{type(err).__name__}: {err}", "promoted": False}

        reason = projector.reason
        if deleted := self._gone(set(self.clips)):
            # What the household deleted is not learnt from: a candidate goes, promoted or not, and the
            # labels are not recorded as learnt, so the next night counts them as new again.
            projector, night = replace(projector, promote=False, candidate=None), None
            if "decoder" in report:  # its adapters go too (the page must not say they were kept)
                report["decoder"]["promoted"] = False
            reason = (
                f"deleted while it ran: {counted(len(deleted), 'recording')} it learnt from or was judged "
                "on; nothing it trained is kept (the next night learns without them)"
            )
        elif night is not None:
            reason = f"projector: {reason}; decoder: {night.reason}"
        elif decoder_skip is not None:
            reason = f"projector: {reason}; decoder: not trained: {decoder_skip}"
        decoder_ok = night is not None and night.promote
        report.update(reason=reason, status="promoted" if projector.promote or decoder_ok else "rejected")
        self._keep_version(serving, before, projector, night, sets.held_items, data_hash)
        # What answered the household before the night and what answers after it, on either path (the
        # page shows the path the server serves: its `--path`, or with `auto` each version's choice).
        path_before = auto_path(serving.info)
        cascade_before = night.before if night is not None else report["cascade"]
        report["served"] = {
            "path_auto": {"before": path_before, "after": report.get("path_auto", path_before)},
            "aligned": {
                "before": before.figures,
                "after": projector.after if projector.promote else before.figures,
            },
            "cascade": {"before": cascade_before, "after": night.after if decoder_ok else cascade_before},
        }
        if not deleted:
            self._save_state(data_hash, digests)
        self._prune(cache, before.caches, sets.train + sets.held, sets.replay_all + sets.general)

    def _night_sets(self, cache: FeatureCache, trainable: list[Label], held: list[Label]) -> NightSets:
        """The household's labelled utterances read, base-household speech for replay and the general
        held-out set (rendered once), the held-out sets' features; their sizes into the report."""
        opts = self.opts
        train_pairs, held_pairs = self._items(trainable), self._items(held)
        if not train_pairs or not held_pairs:
            raise Skip("the audio of the labelled utterances is missing or unreadable")
        households = load_households()
        base = [h for h in households if h.split == "base"]
        replay_manifest = self._bootstrap("replay", opts.replay_n, REPLAY_SEED, self._replay_households(base))
        general_manifest = self._bootstrap("general", opts.general_n, GENERAL_SEED, base)
        contexts = {h.name: context_text(h) for h in households}
        rng = random.Random(self.sample_key)
        replay_all = read_manifest(replay_manifest)
        replay = rng.sample(replay_all, min(len(replay_all), max(len(train_pairs), 16)))
        general = read_manifest(general_manifest)
        context = self._context()
        held_items = self._eval_items(
            cache, [(self.clips[lab.id], a, _utterance(lab), context) for lab, a in held_pairs]
        )
        general_items = self._eval_items(
            cache,
            [(f"g{i}", read_wav(u.audio), u, contexts.get(u.household, "")) for i, u in enumerate(general)],
        )
        self.report["data"].update(
            train=len(train_pairs), heldout=len(held_items), replay=len(replay), general=len(general_items)
        )
        return NightSets(train_pairs, held_pairs, replay_all, replay, general, held_items, general_items)

    def _validate_served(
        self, model: SpeechLLM, serving: Serving, cache: FeatureCache, sets: NightSets, judged: int
    ) -> Before:
        """What is served, on the night's held-out sets cut to the budget (`sets` keeps the cut): the
        projector, the bundle's own where a household version is served, and the cascade (on the general
        set too where the night's decoder adapters will be judged on `judged` > 0 household utterances)."""
        opts, report = self.opts, self.report
        predictions = opts.work / PREDICTIONS_DIR
        cascade_cache = self._cascade_cache(cache, serving.adapter[0] if serving.adapter else None)
        serving_cache = (
            Predictions(predictions, weights_key(serving.projector))
            if serving.projector is not None
            else None
        )
        shipped_cache = (
            Predictions(predictions, weights_key(serving.shipped)) if serving.shipped is not None else None
        )
        per_item = self._time_one(model, serving.projector, sets.held_items[0])
        sets.held_items, sets.general_items = self._fit_validation(
            per_item, sets.held_items, sets.general_items, shipped_cache, judged, serving.adapter is not None
        )
        report["data"].update(
            heldout_evaluated=len(sets.held_items), general_evaluated=len(sets.general_items)
        )
        figures, served_answers = self._evaluate(
            model, serving.projector, serving_cache, sets.held_items, sets.general_items
        )
        shipped_answers = None
        if serving.shipped is not None:
            # the bundle's own: its loss only where the rule reads it (`--decide-on loss`; never cached)
            loss = opts.decide_on == "loss"
            shipped, shipped_answers = self._evaluate(
                model, serving.shipped, shipped_cache, [], sets.general_items, with_loss=loss
            )
            report["shipped"] = {"general": shipped["general"]}
        cascade_sets = {"household": sets.held_items}
        if judged:  # the adapters' gate reads the other voices too
            cascade_sets["general"] = sets.general_items
        cascade = {
            name: answers(model, items, "cascade", cascade_cache) for name, items in cascade_sets.items()
        }
        cascade_cache.save()
        report["before"] = figures
        self._stage("validated the served projector")
        report["cascade"] = {
            name: score_answers(_refs(items), cascade[name]) for name, items in cascade_sets.items()
        }
        return Before(
            figures, served_answers, shipped_answers, cascade, [cascade_cache, serving_cache, shipped_cache],
            per_item,
        )  # fmt: skip

    def _projector_night(
        self,
        model: SpeechLLM,
        serving: Serving,
        cache: FeatureCache,
        sets: NightSets,
        before: Before,
        train_s: float,
        train_decoder: bool,
    ) -> ProjectorNight:
        """Fine-tune the served projector for up to `train_s` and judge the candidate against it (and the
        bundle's own, where a household version is served) on the same sets. Where the decoder adapters
        train, a projector whose share cannot pass once over its utterances is not trained: they get its
        time (`projector_skip`)."""
        opts, report = self.opts, self.report
        if train_decoder and serving.projector is not None:
            examples = [Example(it.features, it.utterance, it.context) for it in sets.held_items[:3]]
            pace = utterance_seconds(model, serving.projector, self.loss_fn, examples)
            if (skipped := projector_skip(pace, len(sets.train) + len(sets.replay), train_s)) is not None:
                report["train"] = {"skipped": skipped, "budget_s": round(train_s, 1)}
                return ProjectorNight(False, f"not trained: {skipped}", before.figures, skipped=skipped)
        result = self._train_projector(model, serving, cache, sets.train, sets.replay, train_s)
        if serving.path is not None and result.best.get("step") == 0:
            # train() kept its starting point: the candidate is the served projector, already validated.
            start, *later = [h["val_loss"] for h in result.history]
            reason = (
                "no better for the household: no epoch of training beat the served projector "
                f"(held-aside loss {start} at the start, {min(later, default=start)} at best after)"
            )
            return ProjectorNight(False, reason, before.figures)
        # After: the candidate on the same sets; promote only if it is better.
        candidate, info = load_projector(result.out / "projector.safetensors", opts.device)
        after, after_answers = self._evaluate(
            model, candidate, Predictions(opts.work / PREDICTIONS_DIR, weights_key(candidate)),
            sets.held_items, sets.general_items,
        )  # fmt: skip
        self._stage("validated the candidate")
        paired = None
        if before.answers is not None and after_answers is not None:
            paired = {
                name: paired_changes(_refs(items), before.answers[name], after_answers[name])
                for name, items in (("household", sets.held_items), ("general", sets.general_items))
            }
            if before.shipped_answers is not None:
                paired["shipped"] = paired_changes(
                    _refs(sets.general_items), before.shipped_answers["general"], after_answers["general"]
                )
            report["changes"] = paired  # per set and metric, the utterances that got [worse, better]
        shipped_general = report["shipped"]["general"] if serving.shipped is not None else None
        promote, reason = decide(
            after, before.figures, opts.tolerance, paired, opts.decide_on, shipped_general
        )
        return ProjectorNight(promote, reason, after, candidate, info, after_answers)

    def _keep_version(
        self,
        serving: Serving,
        before: Before,
        projector: ProjectorNight,
        night: DecoderNight | None,
        held_items: list[Item],
        data_hash: str,
    ) -> None:
        """Write the night's version, promoted where a gate passed, kept on record as rejected where none
        did: each part the night's own where its gate passed, the served one where the other part's
        passed, and when neither passed, the night's candidates. A night that made nothing writes none."""
        report = self.report
        decoder_ok = night is not None and night.promote
        promoted = projector.promote or decoder_ok
        if projector.candidate is not None and (projector.promote or not decoder_ok):
            weights, p_info = projector.candidate, projector.info
            aligned, aligned_answers = projector.after, projector.answers
        else:
            weights, p_info = serving.projector, serving.info
            aligned, aligned_answers = before.figures, before.answers
        if night is not None and (decoder_ok or not projector.promote):
            adapter, cascade_figures = (night.adapter, night.config), night.after
            heard_items, heard = night.items, night.answers
        else:
            adapter, cascade_figures = serving.adapter, report["cascade"]
            heard_items, heard = held_items, before.cascade["household"]
        if weights is None or p_info is None or (projector.candidate is None and night is None):
            return
        # (The adapters' cascade was judged on the first of them, the typed ones, maybe cut to the budget.)
        paths = {}
        if aligned_answers is not None:
            aligned_heard = aligned_answers["household"][: len(heard_items)]
            paths = path_auto(_refs(heard_items), heard, aligned_heard, self.opts.tolerance)
        assert self.bundle_cfg is not None
        decision = (
            {"promoted_at": time.time()}
            if promoted
            else {"rejected": {"reason": report["reason"], "at": time.time()}}
        )
        info = replace(
            p_info,
            encoder=self.bundle_cfg.encoder,
            llm=self.bundle_cfg.llm,
            data_hash=data_hash,
            trained=p_info.trained or weights is projector.candidate,
            decoder=adapter[1] if adapter else None,
            metrics={
                "household": aligned["household"],
                "general": aligned["general"],
                "cascade": cascade_figures,
                **paths,
                "before": {"version": serving.name, **before.figures},
                "run": report["run"],
                **decision,
                "labels": report["data"]["sources"],
            },
        )
        name = self.versions.add(weights, info, adapter[0] if adapter else None)
        if promoted:
            self.versions.promote(name)
            report["path_auto"] = auto_path(info)
        report.update(version=name, pruned=self.versions.prune(self.opts.keep))

    def _prune(
        self,
        cache: FeatureCache,
        used: list[Predictions | None],
        pairs: list[tuple[Label, np.ndarray]],
        speech: list[Utterance],
    ) -> None:
        """Drop the cached answers that neither this night (`used`) nor a kept version can use, and, in the
        data dir's own feature cache, the features of audio no longer used (deleted by retention, or
        computed by an old encoder); a shared --cache-dir is left alone."""
        predictions = self.opts.work / PREDICTIONS_DIR
        keep = {c.path for c in used if c is not None}
        keep.add(self._cascade_cache(cache, None).path)
        for name in self.versions.names():
            with suppress(VersionError):
                keep.add(Predictions(predictions, weights_key(self.versions.load(name)[0])).path)
                if (kept_adapter := self.versions.adapter(name)) is not None:  # (as a night serves it)
                    keep.add(self._cascade_cache(cache, as_judged(kept_adapter[0])).path)
        for path in predictions.glob("*.json"):
            if path not in keep:
                path.unlink(missing_ok=True)
        if self.opts.cache_dir is None:
            audios = [a for _, a in pairs] + [a for _, a in _readable(speech)]
            self.report["data"]["features_pruned"] = prune_features(cache.folder.parent, audios)

    def _train_projector(
        self,
        model: SpeechLLM,
        serving: Serving,
        cache: FeatureCache,
        train_pairs: list[tuple[Label, np.ndarray]],
        replay: list[Utterance],
        train_s: float,
    ) -> TrainResult:
        """Fine-tune the served projector (or a new one) with the loss it was aligned with for up to
        `train_s` into the work folder's candidate bundle; the report's `train` says how."""
        opts = self.opts
        objective, weight = serving.objective()
        assert self.bundle is not None
        manifests = self._manifests(train_pairs, replay)
        # A few hundred utterances are learnt by heart long before the budget ends (a validation every
        # 15 s came too late: the loss was at its lowest before the first one). train() validates
        # its loss on utterances kept out of training (household and replay) after every epoch, which
        # costs a projector pass over cached features, keeps the best projector (the served one, if
        # no epoch beats it) and stops after `patience` epochs without progress.
        cfg = TrainConfig(
            objective=objective, embedlink_weight=weight, batch=opts.batch, micro_batch=opts.micro_batch,
            lr=opts.lr, warmup=10, max_minutes=train_s / 60, max_epochs=PROJECTOR_EPOCHS,
            patience=10, val_every_s=0.0, seed=opts.seed,
            val_answers=False,  # the candidate is scored on this job's own sets below
        )  # fmt: skip
        self._stage("features and manifests ready")
        t_train = time.monotonic()
        _LOGGER.info(
            "training for up to %.0f s on %d household and %d replay utterances (from %s)",
            train_s, len(train_pairs), len(replay), serving.name,
        )  # fmt: skip
        result = train(
            self.bundle, manifests["train"], manifests["val"], opts.work / "candidate", cfg,
            cache_dir=cache.folder.parent, init_projector=serving.path, model=model,
        )  # fmt: skip
        self._stage("trained the projector")
        self.report["train"] = {
            "budget_s": round(train_s, 1),
            "seconds": round(time.monotonic() - t_train, 1),
            "steps": result.steps,
            "step_ms": round(result.step_ms, 1) if not math.isnan(result.step_ms) else None,
            "loss_curve": result.loss_curve,
            "history": [  # train()'s own validation, on the loss only
                {k: h[k] for k in ("epoch", "step", "train_loss", "val_loss", "train_s") if k in h}
                for h in result.history
            ],
            "init": serving.name if serving.path is not None else None,
            "objective": objective,
            "embedlink_weight": weight,
            "lr": opts.lr,
        }
        return result

    def _cascade_cache(self, cache: FeatureCache, adapter: Adapter | None) -> Predictions:
        """The cascade's kept answers, with these decoder adapters (None: Whisper's decoder as built);
        keyed by the encoder's fingerprint the feature cache already computed."""
        key = "cascade-" + cache.fingerprint
        return Predictions(
            self.opts.work / PREDICTIONS_DIR, key + (f"-{adapter_key(adapter)}" if adapter else "")
        )

    def _decoder_night(
        self,
        model: SpeechLLM,
        train_pairs: list[tuple[Label, np.ndarray]],
        held_pairs: list[tuple[Label, np.ndarray]],
        replay_all: list[Utterance],
        sets: dict[str, list[Item]],
        served_answers: dict[str, list[Answer]],
        max_s: float,
        cache: FeatureCache,
    ) -> DecoderNight:
        """Train Whisper's decoder adapters (from the served ones) on the household's transcripts and a
        replay sample, within `max_s`, with a memory of those transcripts and of the held-out ones
        (`held_pairs`); score the cascade with them (the memory without the held-out ones) against the
        served cascade, and, when adapters are served, against Whisper's decoder as built on the other
        voices (as the projector is held to the shipped one); decide by the same rule as the projector."""
        opts, t0 = self.opts, time.monotonic()
        served = model.decoder_adapter
        rng = random.Random(f"decoder/{self.sample_key}")
        n_household, n_replay = decoder_sizes(model, len(train_pairs), max_s)
        household = train_pairs[:n_household]  # the newest
        replay = _readable(rng.sample(replay_all, min(len(replay_all), n_replay)))
        texts = [lab.text for lab, _ in household] + [u.text for u, _ in replay]
        audios = [a for _, a in household] + [a for _, a in replay]
        languages = [lab.language for lab, _ in household] + ["en"] * len(replay)  # replay: English
        replayed = [False] * len(household) + [True] * len(replay)
        feature_cache = None if model.cascade_pad_30s else cache
        examples = decoder_examples(model, texts, audios, languages, feature_cache, replayed)
        too_long = len(texts) - len(examples)  # more words than the decoder writes: not learnt from
        self._stage("built the decoder adapters' examples")
        cfg = DecoderTrainConfig(
            epochs=opts.decoder_epochs, lr=opts.decoder_lr, batch=opts.batch, seed=opts.seed,
            distill=opts.decoder_distill,
            max_s=max(0.0, max_s - (time.monotonic() - t0)),
        )  # fmt: skip
        if model.cascade_pad_30s:  # keys and values of 1500 frames per utterance: one at a time (memory)
            cfg.micro_batch = 1
        _LOGGER.info(
            "training Whisper's decoder adapters for up to %.0f s on %d household and %d replay transcripts"
            " (%d too long for the decoder left out)",
            cfg.max_s, len(household), len(replay), too_long,
        )  # fmt: skip
        config = served[1] if served else AdapterConfig()
        with model.separate_decoder():
            result = train_decoder_adapter(model, examples, cfg, *(served or (None, None)))
            self._stage("trained the decoder adapters")
            # ... and the memory of the household's transcripts, read through them: those they learnt
            # and those held out to judge them, which are left out while they judge (so the version
            # remembers every correction, and the cascade is judged on what it did not remember)
            learnt = [x for x in examples if not x.replayed]
            held = decoder_examples(  # (built after training: their features are not held meanwhile)
                model, [lab.text for lab, _ in held_pairs], [a for _, a in held_pairs],
                [lab.language for lab, _ in held_pairs], feature_cache,
            )  # fmt: skip
            judges = frozenset({x.key for x in held} - {x.key for x in learnt})
            memory = remember(model.whisper, learnt + held, judges)
            self.remembered = {lab.id: lab.text for lab, _ in household + held_pairs}
            kept = result.adapter | memory.tensors()
            adapter = as_judged(kept)
            model.set_decoder_adapter(adapter, config)
            self._stage("remembered the household's transcripts")
            mine = self._cascade_cache(cache, adapter)
            sets = self._fit_decoder_validation(model, sets, mine, served is not None)
            got = {name: answers(model, items, "cascade", mine) for name, items in sets.items()}
        mine.save()
        served_answers = {name: served_answers[name][: len(items)] for name, items in sets.items()}
        figures, served_figures = (
            {name: score_answers(_refs(items), by[name]) for name, items in sets.items()}
            for by in (got, served_answers)
        )
        paired = {
            name: paired_changes(_refs(items), served_answers[name], got[name])
            for name, items in sets.items()
        }
        built = None
        if served is not None:  # the other voices as Whisper's decoder as built hears them
            model.set_decoder_adapter(None)
            plain = self._cascade_cache(cache, None)
            plain_answers = answers(model, sets["general"], "cascade", plain)
            plain.save()
            model.set_decoder_adapter(*served)
            built = score_answers(_refs(sets["general"]), plain_answers)
            paired["shipped"] = paired_changes(_refs(sets["general"]), plain_answers, got["general"])
        promote, reason = decide(figures, served_figures, opts.tolerance, paired, "answers", built)
        _LOGGER.info("Whisper's decoder adapters: %s", reason)
        self._stage("validated the decoder adapters")
        report = {
            "seconds": round(time.monotonic() - t0, 1),
            "train_s": round(result.seconds, 1),
            "teach_s": round(result.teach_s, 1),
            "budget_s": round(max_s, 1),
            "examples": {"household": len(household), "replay": len(replay), "too_long": too_long},
            "memory": {
                "transcripts": len(memory.clips),
                "held_out": len(memory.judges),
                "states": len(memory.values),
            },
            "steps": result.steps,
            "epochs": result.epochs,
            "loss_curve": result.loss_curve,
            "lr": opts.decoder_lr,
            "distill": opts.decoder_distill,
            "lr_curve": result.lr_curve,
            "init": "served" if served else None,
            "before": served_figures,
            "after": figures,
            "changes": paired,
            **({"built": {"general": built}} if built else {}),
            "reason": reason,
            "promoted": promote,
        }
        return DecoderNight(
            kept, config, promote, reason, served_figures, figures, sets["household"], got["household"],
            report,
        )  # fmt: skip

    def _stage(self, stage: str) -> None:
        """When the run reached a stage (seconds into its budget) and its resident memory then (Linux),
        for the report: where a night's time and memory go."""
        entry: dict[str, float] = {"at_s": round(self.elapsed(), 1)}
        with suppress(OSError, ValueError, IndexError):
            status = Path("/proc/self/status").read_text().splitlines()
            kb = {
                line.split(":")[0]: int(line.split()[1])
                for line in status
                if line.startswith(("VmRSS", "VmHWM"))
            }
            entry.update(rss_mb=round(kb["VmRSS"] / 1024), peak_mb=round(kb["VmHWM"] / 1024))
        self.report.setdefault("stages", {})[stage] = entry

    def _context(self) -> str:
        """The household context the server gives the LLM (as it was when it started this job)."""
        path = self.opts.context_file
        if path is not None:
            return load_context_file(path) if path.suffix == ".json" else path.read_text().strip()
        default = self.opts.work / CONTEXT_FILE
        return default.read_text().strip() if default.is_file() else ""

    def _eval_items(
        self, cache: FeatureCache, rows: list[tuple[str, np.ndarray, Utterance, str]]
    ) -> list[Item]:
        feats = cache.features([audio for _, audio, _, _ in rows]) if rows else []
        return [Item(k, a, f, u, c) for (k, a, u, c), f in zip(rows, feats, strict=True)]

    @torch.no_grad()
    def _time_one(self, model: SpeechLLM, serving: Projector | None, item: Item) -> float:
        """Seconds of one validation answer (what sizes the validation and the training time)."""
        t0 = time.perf_counter()
        cap = answer_cap(model, item.utterance)
        if serving is not None:
            model.projector = serving.eval()
            model.run_features(item.features, "aligned", item.context, max_new_tokens=cap)
        else:
            model.understand_text(item.utterance.text, item.context, cap)
        return max(1e-3, time.perf_counter() - t0)

    def _fit_validation(
        self,
        per_item: float,
        held: list[Item],
        general: list[Item],
        shipped: Predictions | None,
        judged: int,
        adapter_served: bool,
    ) -> tuple[list[Item], list[Item]]:
        """Trim the held-out sets (general first, never below a minimum) so that the night's validation
        before and after training (`validation_seconds`; the `shipped` projector on the general set where
        its answers are not cached) takes at most half of what is left of the budget."""
        allowance = 0.5 * max(0.0, self.budget_s - self.elapsed())
        anchor = shipped is not None and any(answer_key(it) not in shipped.data for it in general)

        def cost(nh: int, ng: int) -> float:
            return sum(validation_seconds(per_item, nh, ng, judged, adapter_served, anchor))

        nh, ng = trim_to_fit(cost, allowance, len(held), len(general))
        if (nh, ng) != (len(held), len(general)):
            _LOGGER.info("validating on %d of %d household and %d of %d general utterances (budget)",
                         nh, len(held), ng, len(general))  # fmt: skip
        return held[:nh], general[:ng]

    def _fit_decoder_validation(
        self, model: SpeechLLM, sets: dict[str, list[Item]], cache: Predictions, built: bool
    ) -> dict[str, list[Item]]:
        """Trim the sets the night's decoder adapters are judged on (as `_fit_validation` does) so that
        their cascade answers (and, with `built`, Whisper's decoder as built on the general set) end
        within the budget, at the time their first new answer took. Their answers cost what the
        adapters make Whisper write, unknown until they are trained: at real size, random weights'
        adapters took about 4 s an answer, the served cascade 0.1-0.15 s."""
        held, general = sets["household"], sets["general"]
        new = [it for it in held + general if answer_key(it) not in cache.data][:1]
        if not new:
            return sets
        t0 = time.monotonic()
        answers(model, new, "cascade", cache)
        per_answer = time.monotonic() - t0
        allowance = self.budget_s - self.elapsed() - FINISH_S

        def cost(nh: int, ng: int) -> float:
            return per_answer * (nh + ng * (1 + built))

        nh, ng = trim_to_fit(cost, allowance, len(held), len(general))
        if (nh, ng) != (len(held), len(general)):
            _LOGGER.info(
                "judging the decoder adapters on %d of %d household and %d of %d general utterances "
                "(budget: %.1f s an answer)", nh, len(held), ng, len(general), per_answer,
            )  # fmt: skip
        return {"household": held[:nh], "general": general[:ng]}

    def _evaluate(
        self,
        model: SpeechLLM,
        projector: Projector | None,
        cache: Predictions | None,
        held: list[Item],
        general: list[Item],
        with_loss: bool = True,
    ) -> tuple[dict[str, Any], dict[str, list[Answer]] | None]:
        """Aligned-path metrics, held-out loss (`self.loss_fn`; None without `with_loss`) and the seconds
        it took, of one projector on both held-out sets, and its answers on each."""
        if projector is None or cache is None:  # nothing served yet: the worst possible figures
            empty = {"n": 0, "intent_accuracy": 0.0, "wer": 1.0, "loss": None}
            return {"household": {**empty, "n": len(held)}, "general": dict(empty)}, None
        model.projector = projector.eval()
        out, all_answers = {}, {}
        for name, items in (("household", held), ("general", general)):
            got = answers(model, items, "aligned", cache)
            scores = score_answers(_refs(items), got)
            examples = [Example(it.features, it.utterance, it.context) for it in items]
            t0 = time.monotonic()
            scores["loss"] = (
                val_loss(model, projector, examples, self.loss_fn, self.opts.micro_batch or self.opts.batch)
                if examples and with_loss
                else None
            )
            scores["loss_s"] = round(time.monotonic() - t0, 2)
            out[name], all_answers[name] = scores, got
        cache.save()
        return out, all_answers

    def _manifests(
        self, train_pairs: list[tuple[Label, np.ndarray]], replay: list[Utterance]
    ) -> dict[str, Path]:
        folder = self.opts.work / "manifests"  # one of SCRATCH_DIRS
        folder.mkdir(parents=True, exist_ok=True)
        household = [_utterance(lab, absolute=self.opts.data_dir / "log") for lab, _ in train_pairs]
        # The newest household utterances and as many replayed ones (a random sample) validate.
        n_val = min(len(household) // EARLY_STOP_EVERY, EARLY_STOP_MAX)
        n_replay = max(1, n_val)
        paths = {"train": folder / "train.jsonl", "val": folder / "val.jsonl"}
        write_manifest(paths["train"], household[n_val:] + replay[n_replay:])
        write_manifest(paths["val"], household[:n_val] + replay[:n_replay])
        return paths


def validation_seconds(
    per_item: float, nh: int, ng: int, judged: int, adapter_served: bool, anchor: bool = False
) -> tuple[float, float]:
    """Seconds a night's validation takes on `nh` household and `ng` general held-out utterances, before
    training and after it, at `per_item` seconds an aligned answer (a cascade answer costs 1.5 of them).
    Before: the served projector and the served cascade (on the general set too where the night trains
    decoder adapters: `judged` > 0), and the `anchor` (the shipped projector) on the general set. After:
    the candidate projector, and the night's decoder adapters on the first `judged` household utterances
    (the typed ones: `split_labels`) and the general set, with Whisper as built there where adapters are
    served (`adapter_served`). Answers cached from earlier nights are not subtracted: the worst case."""
    adapters = judged > 0
    before = nh + (1 + anchor) * ng + 1.5 * (nh + adapters * ng)
    after = nh + ng + 1.5 * adapters * (min(nh, judged) + (1 + adapter_served) * ng)
    return per_item * before, per_item * after


def trim_to_fit(cost: Callable[[int, int], float], allowance: float, nh: int, ng: int) -> tuple[int, int]:
    """How many household and general held-out utterances to validate on so that `cost(nh, ng)` seconds
    fit in `allowance`: the general set is cut first, neither below `MIN_EVAL_ITEMS` (the budget is a
    target, not a wall: a night that cannot fit even those still judges on them)."""
    while cost(nh, ng) > allowance and ng > MIN_EVAL_ITEMS:
        ng = max(MIN_EVAL_ITEMS, int(ng * 0.8))
    while cost(nh, ng) > allowance and nh > MIN_EVAL_ITEMS:
        nh = max(MIN_EVAL_ITEMS, int(nh * 0.8))
    return nh, ng


def projector_skip(utterance_s: float, n: int, share_s: float) -> str | None:
    """Why the night leaves the projector as it is and gives its time to Whisper's decoder adapters, or
    None: its share of the training, `share_s`, holds fewer than `PROJECTOR_MIN_PASSES` passes over its
    `n` utterances at `utterance_s` each. At real size on 2 cores a 10-minute night's held half of one:
    5 steps, all inside the learning rate's warm-up of 10, while the adapters stopped on the clock after
    4 epochs; given the projector's time they trained 12 (benchmarks/RESULTS.md)."""
    passes = share_s / max(utterance_s * n, 1e-9)
    if passes >= PROJECTOR_MIN_PASSES:
        return None
    return (
        f"its share of the night ({share_s:.0f} s) holds {passes:.2f} of a pass over its {n} utterances "
        f"at {utterance_s:.2g} s each; Whisper's decoder adapters had its time"
    )


def decoder_sizes(model: SpeechLLM, n_train: int, max_s: float) -> tuple[int, int]:
    """How many household and replayed utterances the decoder adapters train on: all of the
    household's with `DECODER_REPLAY` replayed for each, from the feature cache. A cascade that pads
    to 30 s reads 30 s of features per clip (1500 frames at whisper-base: 1.5 MB each in half
    precision), computed tonight: as many as `DECODER_PADDED_MB` holds and a third of `max_s` can
    encode (timed on one clip), half of them the household's."""
    if not model.cascade_pad_30s:
        return n_train, DECODER_REPLAY * n_train
    t0 = time.monotonic()
    model.encode(np.zeros(TARGET_RATE, np.float32), pad_30s=True)
    each_s = max(1e-3, time.monotonic() - t0)
    size = model.whisper.config.max_source_positions * model.encoder.dim * 2
    n = max(2, min(int(DECODER_PADDED_MB * 2**20 / size), int(max_s / 3 / each_s)))
    household = min(n_train, -(-n // 2))
    return household, n - household


def bootstrap_speech(root: Path, name: str, n: int, seed: int, households: list[Household]) -> Path:
    """Synthetic speech of `households` under `root`, rendered once (deterministic for n, seed and the
    households' names) and reused every night; returns its manifest."""
    names = json.dumps([[h.name, h.areas, [d.name for d in h.devices]] for h in households])
    folder = root / f"{name}-{n}-{seed}-{hashlib.sha256(names.encode()).hexdigest()[:8]}"
    return render_once(folder, households, n, seed)


def held_out(row_id: int, every: int) -> bool:
    """1 in `every` interactions is held out, by a hash of its id: the same side every night."""
    return every > 1 and int(hashlib.sha256(f"heldout/{row_id}".encode()).hexdigest(), 16) % every == 0


def split_labels(
    labels: list[Label], every: int, most_held: int, most_train: int
) -> tuple[list[Label], list[Label]]:
    """The night's held-out and training labels (`held_out`), at most `most_held` and `most_train` of
    them. Held out, the transcripts the household corrected come first, then the newest: they alone
    judge Whisper's decoder adapters, and a set cut to the budget or to `most_held` keeps them. Training
    labels, the newest first."""
    held = [lab for lab in labels if held_out(lab.id, every)]
    trainable = [lab for lab in labels if not held_out(lab.id, every)]
    held.sort(key=lambda lab: (not lab.typed, -lab.created_at))
    trainable.sort(key=lambda lab: -lab.created_at)
    return held[:most_held], trainable[:most_train]


def _utterance(label: Label, absolute: Path | None = None) -> Utterance:
    audio = Path(label.audio_path) if absolute is None else (absolute / label.audio_path).resolve()
    # No intent source: the label gives the words alone, which must not teach "not a command".
    return Utterance(
        audio, label.text, label.intent, "", HOUSEHOLD, transcript_only=label.intent_source is None
    )


def _intent_text(intent: Intent | None) -> str:
    return intent.to_text() if intent else ""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _readable(utterances: list[Utterance]) -> list[tuple[Utterance, np.ndarray]]:
    out = []
    for utt in utterances:
        with suppress(AudioError):
            out.append((utt, read_wav(utt.audio)))
    return out


def prune_features(cache_dir: Path, keep: list[np.ndarray]) -> int:
    """Delete cached encoder features of every clip not in `keep` (under any encoder)."""
    wanted = {FeatureCache.key(a) for a in keep}
    removed = 0
    for path in Path(cache_dir).glob("*/*/*.safetensors"):
        if path.stem not in wanted:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass(frozen=True)
class NightData:
    """What nights derive from the logged clips of a data dir, by clip (`FeatureCache.key`): the cached
    encoder features (under every encoder), the answers `Predictions` kept for them (what each
    projector heard) and the states the versions' decoder memories keep of them (`decoder_memory.py`).
    The interaction log forgets them with the clip (`store.Derived`), and `served` (the server's) takes
    them out of the memory it serves."""

    data_dir: Path
    served: Callable[[set[str]], None] | None = None

    def key(self, audio: np.ndarray) -> str:
        """A clip's key: the one its features are cached by."""
        return FeatureCache.key(audio)

    def forget(self, keys: set[str], ids: set[int]) -> None:
        """Delete the features and answers of these clips and their states in the memories
        (`forget_words`); when no night runs (a running one does it as it ends), the label digests of
        these rows and a killed night's scratch too."""
        self.forget_clips(keys)
        self.forget_words(keys)
        work = self.data_dir / ADAPT_DIR
        if work.is_dir():
            with job_lock(work) as free:
                if free:
                    remove_scratch(work)  # a killed run's: the manifests hold the household's words
                    forget_label_digests(work, ids)

    def forget_words(self, keys: set[str]) -> None:
        """Take these clips' states out of the served memory and, when no night runs (a running one does
        it as it ends), out of the versions' memories: they hold the words the clips were corrected to."""
        if not keys:
            return
        if self.served is not None:
            self.served(keys)
        work = self.data_dir / ADAPT_DIR
        if work.is_dir():
            with job_lock(work) as free:
                if free:
                    Versions(self.data_dir).forget_memory(keys)

    def night_running(self) -> bool:
        """True while a night (the server's or one started by hand) holds the job lock."""
        work = self.data_dir / ADAPT_DIR
        if not (work / LOCK_FILE).is_file():
            return False
        with job_lock(work) as free:
            return not free

    def forget_clips(self, keys: set[str]) -> None:
        """Delete the cached features and the kept answers of these clips."""
        if not keys:
            return
        for key in keys:
            for path in (self.data_dir / FEATURES_DIR).glob(f"*/{key[:2]}/{key}.safetensors"):
                path.unlink(missing_ok=True)
        for path in (self.data_dir / ADAPT_DIR / PREDICTIONS_DIR).glob("*.json"):
            try:
                answers = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            kept = {k: v for k, v in answers.items() if k.split("/", 1)[0] not in keys}
            if len(kept) < len(answers):
                try:
                    write_atomic(path, json.dumps(kept).encode())
                except OSError:  # a full disk must not stop a delete: the next night answers again
                    path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ CLI
def add_adapt_args(parser: argparse.ArgumentParser) -> None:
    d = AdaptOptions(Path("."))
    parser.add_argument("--data-dir", required=True, type=Path, help="the server's data dir")
    parser.add_argument("--model", help="bundle folder, dev or preset:NAME (default: the one serve recorded)")
    parser.add_argument(
        "--now", action="store_true", help="run even if the labels are unchanged or few are new"
    )
    parser.add_argument(
        "--budget-minutes", type=float, default=d.budget_minutes, help="time budget of the run"
    )
    parser.add_argument("--min-new", type=int, default=d.min_new, help="skip with fewer new labels than this")
    parser.add_argument("--keep", type=int, default=d.keep, help="projector versions kept")
    parser.add_argument(
        "--tolerance", type=float, default=d.tolerance,
        help="how much worse on other voices a candidate may be (intent accuracy, WER)",
    )  # fmt: skip
    parser.add_argument(
        "--decide-on", choices=("answers", "loss"), default=d.decide_on,
        help="answers: intent accuracy, WER, then loss; loss: the held-out loss alone (tiny dev models)",
    )  # fmt: skip
    parser.add_argument(
        "--heldout-every", type=int, default=d.heldout_every, help="hold out 1 in N utterances"
    )
    parser.add_argument(
        "--heldout-max", type=int, default=d.heldout_max, help="most recent held-out utterances used"
    )
    parser.add_argument(
        "--train-max", type=int, default=d.train_max, help="most recent utterances trained on"
    )
    parser.add_argument(
        "--teacher-min-confidence", type=float, default=d.teacher_min_confidence,
        help="keep teacher transcripts at or above this mean token log-probability",
    )  # fmt: skip
    parser.add_argument(
        "--outcome-window", type=float, default=d.outcome_window_s,
        help="seconds in which a repeat or an undo means the outcome is not confirmed",
    )  # fmt: skip
    parser.add_argument(
        "--replay-n", type=int, default=d.replay_n, help="base-household utterances for replay"
    )
    parser.add_argument(
        "--general-n", type=int, default=d.general_n, help="base-household held-out utterances"
    )
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of the fine-tuning")
    parser.add_argument(
        "--decoder-epochs", type=int, default=d.decoder_epochs,
        help="passes of Whisper's decoder adapters over the household's transcripts (0: not trained)",
    )  # fmt: skip
    parser.add_argument(
        "--decoder-lr", type=float, default=d.decoder_lr, help="learning rate of the adapters"
    )
    parser.add_argument(
        "--decoder-distill", type=float, default=d.decoder_distill,
        help="weight, on replayed transcripts, of what the served adapters wrote against the true words",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=d.batch)
    add_micro_batch_arg(parser, d.micro_batch)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--nice", type=int, default=10, help="CPU priority increment of the job (0: none)")
    parser.add_argument("--context-file", type=Path, help="household context (JSON as for serve, or text)")
    parser.add_argument(
        "--bootstrap-dir", type=Path, help="where base-household speech is rendered (default DATA/bootstrap)"
    )
    parser.add_argument("--cache-dir", type=Path, help="encoder feature cache (default DATA/cache/features)")
    add_dtype_arg(parser)


def process_age_s() -> float:
    """Seconds since this process started, its interpreter and imports included (Linux; 0 elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


def options_from_args(args: argparse.Namespace) -> AdaptOptions:
    """The job's options from `adapt`'s flags, each option from the flag of its name (a list written out
    by hand once dropped `--decoder-epochs` and `--decoder-lr`)."""
    given = vars(args) | {"outcome_window_s": args.outcome_window}
    return AdaptOptions(**{f.name: given[f.name] for f in fields(AdaptOptions) if f.name in given})


def run_adapt(args: argparse.Namespace) -> int:
    started = time.monotonic() - process_age_s()  # the budget is the process's: imports take seconds
    return_freed_memory()  # before the model is loaded: the budget is the process's peak
    if args.nice > 0:
        with suppress(OSError):
            os.nice(args.nice)
    with suppress(OSError):  # short of memory, the kernel kills the night, not the server beside it
        Path("/proc/self/oom_score_adj").write_text("1000")
    with suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    report = run_job(options_from_args(args), started)
    print(json.dumps(report))
    return 1 if report["status"] == "failed" else 0


def add_rollback_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the server's data dir")
    parser.add_argument(
        "--to",
        help="version to serve (e.g. v0002, a rejected one too, or base); default: the promoted one before",
    )


def run_rollback(args: argparse.Namespace) -> int:
    versions = Versions(args.data_dir)
    before = versions.current()
    after = versions.rollback(args.to)
    _LOGGER.info("rolled back from %s to %s; a running server picks it up within seconds", before, after)
    if after != BASE and (rejected := versions.info(after).metrics.get("rejected")):
        _LOGGER.warning("%s is served anyway: its night rejected it (%s)", after, rejected["reason"])
    print(json.dumps({"from": before, "to": after}))
    return 0
