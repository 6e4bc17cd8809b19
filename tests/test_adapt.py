"""The nightly job on a real data dir: promote, skip (unchanged, too few new labels), reject (a trained
candidate kept on record), rollback, `eval --data-dir`, and kills of the running job. Runs build on each
other (module order)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from adaptation import cli, job_flags, last_json, log_household, unseen_speech
from safetensors.torch import load_file
from serving import file_size_limit

from wyoming_tinyalign.__main__ import main
from wyoming_tinyalign.adapt import (
    EARLY_STOP_MAX,
    PROJECTOR_EPOCHS,
    AdaptOptions,
    Item,
    Job,
    Predictions,
    _utterance,
    answers,
    bootstrap_speech,
    held_out,
    job_lock,
    projector_skip,
    run_job,
    split_labels,
    validation_seconds,
)
from wyoming_tinyalign.audio import read_wav
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.intents import Intent
from wyoming_tinyalign.labels import Label
from wyoming_tinyalign.manifest import Utterance, read_manifest, write_manifest
from wyoming_tinyalign.model.bundle import BundleError
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.store import SCHEMA_VERSION, InteractionStore, StoreDamaged
from wyoming_tinyalign.versions import BASE, Versions, served

BUDGET = "0.4"  # minutes (the first night also computes the encoder features)


@pytest.fixture(scope="module")
def household(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose log holds 30 corrected utterances of a household the model never heard."""
    data = tmp_path_factory.mktemp("household") / "data"
    log_household(data, micro_model, unseen_speech(tmp_path_factory, 30, seed=21))
    return data


def options(data: Path, tmp_path_factory: pytest.TempPathFactory, **kw: object) -> AdaptOptions:
    flags = job_flags(tmp_path_factory)
    bootstrap = Path(flags[flags.index("--bootstrap-dir") + 1])
    base = dict(
        replay_n=32, general_n=16, bootstrap_dir=bootstrap, teacher_min_confidence=1.0, decide_on="loss",
        decoder_epochs=0,
    )  # fmt: skip
    return AdaptOptions(data_dir=data, **(base | kw))  # type: ignore[arg-type]


def adaptations(data: Path) -> list[sqlite3.Row]:
    with closing(sqlite3.connect(data / "log" / "interactions.sqlite3")) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM adaptations ORDER BY id").fetchall()


def test_a_night_with_corrections_promotes_a_better_projector(
    household: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stale = household / "cache" / "features" / "an-old-encoder" / "ab" / "ab12.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"features of a clip no longer used")
    proc = cli(
        "adapt",
        "--data-dir",
        str(household),
        "--now",
        "--budget-minutes",
        BUDGET,
        *job_flags(tmp_path_factory),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = last_json(proc.stdout)
    assert report["status"] == "promoted", report
    assert report["version"] == "v0001" and report["serving_version"] == "base"
    data = report["data"]
    assert data["labelled"] == 30 and data["sources"] == {"correction": 30, "teacher": 0, "outcome": 0}
    assert data["train"] + data["heldout"] == 30 and data["heldout"] >= 1
    assert data["replay"] >= 16 and data["general"] == 16
    assert data["features_pruned"] == 1 and not stale.exists()  # the night keeps those it uses
    before, after = report["before"]["household"], report["after"]["household"]
    # "Better" at micro size, where every projector's answers are noise: a lower held-out loss on the
    # household's held-out utterances (`--decide-on loss`; the default rule, on intent accuracy and WER
    # first, is unit-tested in test_versions.py and measured at small size by the benchmark).
    assert after["loss"] < 0.995 * before["loss"] and "held-out loss" in report["reason"]
    assert {"intent_accuracy", "wer", "n_intent"} <= after.keys()
    assert report["train"]["steps"] > 0 and report["train"]["loss_curve"]
    assert report["duration_s"] > 0 and report["peak_rss_mb"] > 0 and "cascade" in report
    assert "shipped" not in report  # the shipped projector is the served one
    assert "decoder" not in report  # `--decoder-epochs 0` (job_flags): the projector alone
    # The version is on disk with its validation, served through the pointer.
    versions = Versions(household)
    assert versions.current() == "v0001"
    metrics = versions.info("v0001").metrics
    assert metrics["household"] == after and metrics["cascade"]["household"]["n"] == data["heldout_evaluated"]
    (row,) = adaptations(household)
    assert (
        row["status"] == "promoted"
        and row["version"] == "v0001"
        and json.loads(row["report"])["run"] == row["id"]
    )
    with closing(sqlite3.connect(household / "log" / "interactions.sqlite3")) as conn:
        assert conn.execute("SELECT DISTINCT label_source FROM interactions").fetchall() == [("correction",)]


def test_the_same_night_on_the_same_log_makes_the_same_projector(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The projector's learning rate decays over its epochs, not over the clock: a night the budget
    does not cut, run again on the same log, trains the same candidate to the bit (its rate read the
    clock, and two such nights parted in the fifth digit of a loss and then in their verdicts). The
    same holds with the model in another folder: the replay samples are drawn from the labels, not
    from the data hash, which holds the model's folder (and so tests' outcomes varied with theirs)."""
    first = tmp_path_factory.mktemp("same") / "data"
    log_household(first, micro_model, unseen_speech(tmp_path_factory, 30, seed=21))
    second = tmp_path_factory.mktemp("same-again") / "data"
    shutil.copytree(first, second)
    moved = shutil.copytree(micro_model, tmp_path_factory.mktemp("moved") / "model")
    reports = [
        run_job(options(d, tmp_path_factory, now=True, budget_minutes=2.0, model=str(m)))
        for d, m in ((first, micro_model), (second, moved))
    ]
    assert reports[0]["data_hash"] != reports[1]["data_hash"]  # (the model's folder is in it)
    trained = [r["train"] for r in reports]
    assert all(t["seconds"] < 0.5 * t["budget_s"] for t in trained)  # the budget cut neither
    assert trained[0]["steps"] == trained[1]["steps"] and len(trained[0]["history"]) <= PROJECTOR_EPOCHS + 1
    losses = [[(h["step"], h["train_loss"], h["val_loss"]) for h in t["history"]] for t in trained]
    assert losses[0] == losses[1]
    assert reports[0]["status"] == reports[1]["status"] == "promoted"
    one, two = (load_file(d / "projectors" / "v0001.safetensors") for d in (first, second))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_unchanged_labels_are_skipped(household: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    report = run_job(options(household, tmp_path_factory))
    assert report["status"] == "skipped" and "not changed" in report["reason"]
    assert Versions(household).current() == "v0001"


def test_too_few_new_labels_are_skipped(
    household: Path, micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_household(household, micro_model, unseen_speech(tmp_path_factory, 2, seed=22))
    report = run_job(options(household, tmp_path_factory, min_new=5))
    assert report["status"] == "skipped" and report["reason"].startswith("only 2 new labels;")


def test_a_worse_candidate_is_rejected_and_the_served_version_stays(
    household: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A learning rate of 50 wrecks the projector: the candidate is worse for the household."""
    report = run_job(options(household, tmp_path_factory, now=True, lr=50.0, budget_minutes=0.1))
    assert report["status"] == "rejected", report
    assert "for the household" in report["reason"] and report.get("version") is None
    # train() kept its starting point, so the served projector's figures stand for the candidate.
    assert "no epoch of training beat the served projector" in report["reason"]
    assert report["after"] == report["before"] and report["train"]["history"][0]["step"] == 0
    # A household version is served, so the bundle's own projector was scored on the same general set.
    shipped = report["shipped"]["general"]
    assert shipped["n"] == report["before"]["general"]["n"] and shipped["loss"] is not None
    assert Versions(household).current() == "v0001" and Versions(household).names() == ["v0001"]
    assert [r["status"] for r in adaptations(household)][-1] == "rejected"


def test_a_rejected_candidate_is_kept_for_the_household_to_serve_anyway(
    household: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Held to a bar no projector clears on other voices (a general loss below zero), a trained candidate
    is rejected, and kept on record: not served, servable by `rollback --to`, passed over by a plain one.
    The night starts from the bundle's own projector (the household rolled back to it): a night from
    v0001 on the labels v0001 was trained on may find no epoch better, and then makes no candidate."""
    versions = Versions(household)
    assert versions.rollback("base") == "base"
    report = run_job(options(household, tmp_path_factory, now=True, tolerance=-1.0))
    assert report["status"] == "rejected" and report["train"]["steps"] > 0, report
    assert report.get("version") == "v0002" and report["pruned"] == [], report["reason"]
    assert versions.current() == "base" and versions.rejected("v0002")
    metrics = versions.info("v0002").metrics
    assert (
        metrics["rejected"]["reason"] == report["reason"]
        and metrics["household"] == report["after"]["household"]
    )
    assert "promoted_at" not in metrics and metrics["before"]["version"] == "base"
    assert adaptations(household)[-1]["version"] == "v0002"
    assert main(["rollback", "--data-dir", str(household), "--to", "v0002"]) == 0
    assert last_json(capsys.readouterr().out) == {"from": "base", "to": "v0002"}
    assert "v0002 is served anyway: its night rejected it" in caplog.text
    assert versions.rollback() == "v0001"  # back to the promoted version before it


def test_rollback_from_the_command_line(household: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proc = cli("rollback", "--data-dir", str(household))
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc.stdout) == {"from": "v0001", "to": "base"}
    assert main(["rollback", "--data-dir", str(household), "--to", "v0001"]) == 0  # the same, in-process
    assert last_json(capsys.readouterr().out) == {"from": "base", "to": "v0001"}
    assert main(["rollback", "--data-dir", str(household), "--to", "v0042"]) == 1
    assert "no version 'v0042'" in capsys.readouterr().err


def test_eval_of_the_households_promoted_model(
    household: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    utterances = unseen_speech(tmp_path_factory, 2, seed=22)
    manifest = tmp_path_factory.mktemp("eval") / "manifest.jsonl"
    write_manifest(manifest, [u for u, _ in utterances])
    proc = cli("eval", "--data-dir", str(household), "--manifest", str(manifest), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["projector_version"] == "v0001" and report["n"] == 2
    # On the path the server answers on with it (`serve`'s default, `--path auto`), named in the report:
    # the aligned path only where the night found it beat the cascade.
    beats = Versions(household).info("v0001").metrics["aligned_beats_cascade"]
    assert report["path"] == ("aligned" if beats else "cascade"), beats


@pytest.mark.parametrize("moment", ["loading", "training for up to"])
def test_a_job_killed_at_any_moment_leaves_a_loadable_version(
    household: Path, micro_model: Path, tmp_path_factory: pytest.TempPathFactory, moment: str
) -> None:
    versions = Versions(household)
    kept, serving = versions.names(), versions.current()  # (v0001 served, v0002 rejected: the tests above)
    job = subprocess.Popen(
        [sys.executable, "-m", "wyoming_tinyalign", "adapt", "--data-dir", str(household), "--now",
         "--budget-minutes", "1", *job_flags(tmp_path_factory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert job.stderr is not None
    seen = []
    for line in job.stderr:
        seen.append(line)
        if moment in line:
            break
    else:
        pytest.fail("".join(seen[-30:]))
    time.sleep(0.5)
    job.send_signal(signal.SIGKILL)
    assert job.wait(60) == -signal.SIGKILL
    model = SpeechLLM.load(micro_model)
    current = served(household, micro_model, model.encoder.dim, model.llm.config.hidden_size)
    assert current.name == serving  # what a server (re)starting loads, whole
    assert (current.projector is not None) is (serving != BASE)
    assert versions.names() == kept  # nothing half-written, nothing lost
    # The next run finds the killed one still marked running and records it as interrupted.
    assert run_job(options(household, tmp_path_factory, min_new=10**6))["status"] == "skipped"
    assert adaptations(household)[-2]["status"] == "failed"
    assert "interrupted" in adaptations(household)[-2]["reason"]


def test_a_full_disk_fails_the_night_and_loses_nothing(
    household: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A disk that takes no file past 400 KB (`RLIMIT_FSIZE`, EFBIG as a full disk gives ENOSPC): the
    candidate's checkpoint (520 KB) cannot be written. The run is recorded as failed with the reason;
    the served version, the kept ones and the job's state (a failed night saves no labels' hash) stand."""
    versions = Versions(household)
    kept, current = versions.names(), versions.current()
    state = (household / "adapt" / "state.json").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "wyoming_tinyalign", "adapt", "--data-dir", str(household), "--now",
         "--budget-minutes", BUDGET, *job_flags(tmp_path_factory)],
        capture_output=True, text=True, timeout=600,
        preexec_fn=file_size_limit(400 * 1024),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = last_json(proc.stdout)
    assert report["status"] == "failed", report
    assert report["reason"].startswith("OSError: [Errno 27] File too large: ")  # and the file it was
    assert report["reason"].endswith("projector.safetensors'")
    run = adaptations(household)[-1]
    assert run["status"] == "failed" and run["reason"] == report["reason"]
    assert versions.names() == kept and versions.current() == current
    assert (household / "adapt" / "state.json").read_bytes() == state


def test_a_night_whose_served_version_is_damaged_starts_from_the_bundles_projector(
    household: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The served version's file cut short (a damaged disk; on a copy of the household's data dir): the
    night says so, fine-tunes the bundle's own projector instead, and ends as a night does."""
    data = tmp_path / "data"
    shutil.copytree(household, data)
    versions = Versions(data)
    name = versions.current()
    assert name != BASE
    damaged = versions.path(name)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    report = run_job(options(data, tmp_path_factory, now=True))
    assert (
        f"version {name} cannot be used" in caplog.text
        and "starting from the bundle's projector" in caplog.text
    )
    assert report["status"] == "promoted", report  # (on this log it trains a better one: seeded)
    assert (
        report["serving_version"] == name and report["train"]["init"] == BASE and report["train"]["steps"] > 0
    )
    assert "shipped" not in report  # the bundle's own projector is the one judged against
    assert versions.current() == report["version"] != name
    assert versions.info(report["version"]).metrics["before"]["version"] == BASE


def test_a_night_whose_log_is_set_aside_meanwhile_is_recorded_in_the_new_one(
    tmp_path: Path, micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The server sets a log found damaged aside while a night runs (`store.start_over`): the night's row
    went with it, and the household's page did not list the night (nor the version it promoted)."""
    data = tmp_path / "data"
    log_household(data, micro_model, unseen_speech(tmp_path_factory, 30, seed=21))
    log = tmp_path / "job.log"
    with open(log, "wb") as stderr:
        job = subprocess.Popen(
            [sys.executable, "-m", "wyoming_tinyalign", "adapt", "--data-dir", str(data), "--now",
             "--budget-minutes", BUDGET, *job_flags(tmp_path_factory)],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while "training for up to" not in log.read_text():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    server = InteractionStore(data / "log")  # as the server does when SQLite says the file is damaged
    server.open()
    server.start_over(StoreDamaged("the interaction log is damaged"))
    server.close()
    stdout, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log.read_text()[-3000:]
    report = last_json(stdout)  # promoted or rejected: the clips it trains on went with the old log
    assert report["status"] in ("promoted", "rejected") and report["version"] == "v0001", report
    (row,) = adaptations(data)
    assert (row["status"], row["version"], row["id"]) == (report["status"], "v0001", report["run"])
    assert json.loads(row["report"]) == report and row["finished_at"] == report["finished_at"]
    assert "the run is recorded in the new one too" in log.read_text()
    (aside,) = InteractionStore(data / "log").set_aside_logs()
    with closing(sqlite3.connect(aside / "interactions.sqlite3")) as conn:  # the old log's row stands
        assert conn.execute("SELECT status FROM adaptations").fetchall() == [(report["status"],)]


@pytest.mark.parametrize("log", ["newer", "damaged"])
def test_a_log_the_night_cannot_open_stops_it_with_one_line_and_is_left_as_it_is(
    tmp_path: Path, log: str
) -> None:
    """A newer version's log, or a damaged one (the server sets that aside, not the night)."""
    db = tmp_path / "log" / "interactions.sqlite3"
    db.parent.mkdir()
    if log == "newer":
        with closing(sqlite3.connect(db)) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    else:
        db.write_bytes(b"a power cut " * 1000)
    before = db.read_bytes()
    proc = cli("adapt", "--data-dir", str(tmp_path), "--now")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("newer" if log == "newer" else "not a database") in last
    assert db.read_bytes() == before and sorted(p.name for p in db.parent.iterdir()) == [db.name]


def test_the_nights_time_budget_counts_from_the_start_of_its_process(
    tmp_path: Path, micro_model: Path
) -> None:
    """The `adapt` command's budget counts its interpreter's start and imports (torch, transformers:
    seconds), which the job's own clock did not see: a real-size 10-minute night took 604 s on the wall
    clock while its report said 600.0 s. Here a night with nothing to learn reports its process's time."""
    store = InteractionStore(tmp_path / "log")
    store.open()
    store.close()
    t0 = time.monotonic()
    proc = cli("adapt", "--data-dir", str(tmp_path), "--model", str(micro_model))
    wall = time.monotonic() - t0
    report = last_json(proc.stdout)
    assert report["status"] == "skipped", report
    assert 0.5 * wall <= report["duration_s"] <= wall, (report["duration_s"], wall)


@pytest.mark.parametrize("threads", [None, 1])
def test_a_night_uses_every_core_unless_told_otherwise(
    tmp_path: Path, micro_model: Path, threads: int | None
) -> None:
    """The job runs at `nice` 10, so the server beside it answers first (`benchmarks/night_latency.py`).
    It kept to one thread: a real-size night on 2 cores judged its projector on 17 held-out utterances
    where both cores judged 28. Its report says how many threads it had."""
    store = InteractionStore(tmp_path / "log")
    store.open()
    store.close()
    flags = [] if threads is None else ["--threads", str(threads)]
    proc = cli("adapt", "--data-dir", str(tmp_path), "--model", str(micro_model), *flags)
    report = last_json(proc.stdout)
    assert report["status"] == "skipped", report
    every_core = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert report["threads"] == (threads or int(every_core)), report


def test_replay_speech_rehearses_the_homes_own_names(tmp_path: Path) -> None:
    """Names fetched from Home Assistant (`DATA/household.json`) are spoken by the base voices in the
    replay speech; without the file the replay is the base households alone."""
    data = tmp_path / "data"
    data.mkdir()
    base = [h for h in load_households() if h.split == "base"]
    home = {"name": "home", "split": "household", "speakers": [], "areas": ["sunroom"],
            "devices": [{"name": "aquarium pump", "domain": "switch", "area": "sunroom"}]}  # fmt: skip
    with closing(sqlite3.connect(":memory:")) as conn:
        job = Job(AdaptOptions(data_dir=data), conn)
        assert job._replay_households(base) == base
        (data / "household.json").write_text(json.dumps({"households": [home]}))
        houses = job._replay_households(base)
    assert [h.name for h in houses] == [h.name for h in base] + ["home"]
    assert houses[-1].speakers == [s for h in base for s in h.speakers]
    manifest = bootstrap_speech(tmp_path / "boot", "replay", 40, 1, houses)
    texts = [u.text for u in read_manifest(manifest) if u.household == "home"]
    assert texts and any("aquarium pump" in t for t in texts)


def test_the_job_runs_in_bfloat16_as_a_server_started_with_it(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`--dtype bfloat16`, which a server run in it passes on: the night loads the backbones in
    bfloat16 and still trains and validates its float32 projector. The budget leaves the training to end
    by itself (patience), so that the night is the same on a busy machine."""
    data = tmp_path_factory.mktemp("bf16") / "data"
    log_household(data, micro_model, unseen_speech(tmp_path_factory, 30, seed=21))
    report = run_job(options(data, tmp_path_factory, now=True, dtype="bfloat16", budget_minutes=1.0))
    assert report["status"] == "promoted", report  # (on this log it trains a better one: seeded)
    assert report["dtype"] == "bfloat16" and report["train"]["steps"] > 0
    assert report["before"]["household"]["loss"] > 0 and report["after"]["household"]["loss"] > 0


def test_cascade_answers_load_whisper_again_only_for_answers_not_cached(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A night whose cascade answers are all cached does not load Whisper a second time; one that lacks
    an answer does (here from a folder with no Whisper in it, so the load fails)."""
    model = SpeechLLM.load(micro_model)
    items = [
        Item(f"u{i}", audio, model.encode(audio), utterance, "")
        for i, (utterance, audio) in enumerate(unseen_speech(tmp_path_factory, 4, seed=24))
    ]
    cache = Predictions(tmp_path / "predictions", "cascade")
    first = answers(model, items[:3], "cascade", cache)
    (tmp_path / "no-whisper").mkdir()
    model.whisper_ref = str(tmp_path / "no-whisper")
    assert answers(model, items[:3], "cascade", cache) == first
    with pytest.raises(BundleError, match="cannot load Whisper again"):
        answers(model, items, "cascade", cache)


def test_the_teacher_reads_whispers_decoder_on_a_load_it_lets_go(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher (and the cascade) decode with a second load of Whisper, let go afterwards: the
    model's own Whisper only ever encodes, so the decoder's checkpoint pages are not resident while the
    night trains. The second load decodes as the model's own would, leaning toward the household's
    names as the server does."""
    data = tmp_path_factory.mktemp("teacher") / "data"
    utterances = unseen_speech(tmp_path_factory, 4, seed=24)
    log_household(data, micro_model, utterances, correct=False)
    model = SpeechLLM.load(micro_model)
    context_file = data / "household.txt"
    context_file.write_text("areas: den; devices: zebra lamp\n")
    biased_for: list[str] = []
    name_bias = model.name_bias
    monkeypatch.setattr(model, "name_bias", lambda context: biased_for.append(context) or name_bias(context))
    own = model.whisper
    decoded: list[int] = []
    own.get_decoder().register_forward_hook(lambda *_: decoded.append(1))
    store = InteractionStore(data / "log")
    store.open()
    try:
        job = Job(AdaptOptions(data_dir=data, context_file=context_file), store.conn)
        job.model = model
        assert job._teacher() == len(utterances)
        assert biased_for == ["areas: den; devices: zebra lamp"] * len(utterances)
        rows = store.conn.execute("SELECT audio_path, teacher_transcript FROM interactions").fetchall()
    finally:
        store.close()
    assert not decoded and model.whisper is own
    (audio_path, transcript), *_ = rows
    feats = model.encode(read_wav(data / "log" / audio_path))
    assert transcript == model.transcribe_cascade(feats, context=job._context())[0]
    assert decoded  # the hook does see the model's own decoder run


def test_a_label_without_an_intent_is_trained_on_its_words_alone(tmp_path: Path) -> None:
    """The teacher's label (or a correction of the words only) does not say what was meant: it goes to the
    night's manifests as transcript-only, not as "not a command", which a correction can still say."""
    labels = {
        "teacher": Label(1, "a.wav", 1.0, "turn on the fan", None, "teacher", "teacher", None),
        "not a command": Label(2, "b.wav", 2.0, "thank you", None, "correction", "correction", "correction"),
        "corrected": Label(
            3, "c.wav", 3.0, "turn on the fan", Intent("HassTurnOn", {"name": "fan"}), "correction",
            "teacher", "correction",
        ),
    }  # fmt: skip
    path = tmp_path / "train.jsonl"
    write_manifest(path, [_utterance(label, absolute=tmp_path) for label in labels.values()])
    read = {name: u for name, u in zip(labels, read_manifest(path), strict=True)}
    assert [u.transcript_only for u in read.values()] == [True, False, False]
    assert read["teacher"].intent is None and read["corrected"].intent == labels["corrected"].intent


def test_the_held_out_transcripts_the_household_typed_are_kept_first(tmp_path: Path) -> None:
    """Whisper's decoder adapters are judged on the held-out transcripts the household corrected alone:
    a held-out set cut to `--heldout-max` (or to the budget) keeps those before newer teacher labels.
    Which side a row falls on does not change."""
    teacher = Label(0, "0.wav", 0.0, "turn on the fan", None, "teacher", "teacher", None)
    labels = [
        replace(teacher, id=i, created_at=float(i), source="correction", text_source="correction")
        if i % 7 == 0 else replace(teacher, id=i, created_at=float(i))
        for i in range(200)
    ]  # fmt: skip
    held, train = split_labels(labels, 5, 12, 50)
    everyone = [lab for lab in labels if held_out(lab.id, 5)]
    typed = [lab for lab in everyone if lab.typed]
    assert 0 < len(typed) < 12 < len(everyone)  # (the hash's own split of these rows)
    assert held[: len(typed)] == sorted(typed, key=lambda lab: -lab.created_at)
    newest_taught = sorted(set(everyone) - set(typed), key=lambda lab: -lab.created_at)
    assert held[len(typed) :] == newest_taught[: 12 - len(typed)]
    assert train == sorted(set(labels) - set(everyone), key=lambda lab: -lab.created_at)[:50]
    again, _ = split_labels(list(reversed(labels)), 5, 200, 200)
    assert {lab.id for lab in again} == {lab.id for lab in everyone}


def test_the_budget_counts_the_adapters_answers_on_the_typed_utterances_alone(tmp_path: Path) -> None:
    """The night's adapters answer only the held-out utterances the household typed (they come first):
    what validating costs, and so how far the held-out sets are cut to the budget, counts those alone."""
    items = [Item(f"c{i}", np.zeros(1), torch.zeros(1), None, "") for i in range(60)]  # type: ignore[arg-type]
    held, general = items[:40], items[40:]
    with sqlite3.connect(":memory:") as conn:
        job = Job(AdaptOptions(data_dir=tmp_path, budget_minutes=1.0), conn)
        # Half of a minute's budget: served and candidate on both sets, the cascade (1.5x) on the first...
        fit = job._fit_validation(0.11, held, general, None, 0, adapter_served=False)
        assert fit == (held, general)  # 0.11 * (80 + 40 + 1.5 * 40) = 19.8 s of 30
        # ...and the adapters on 40 typed and the general set: 0.11 * (180 + 1.5 * 80) = 33 s: cut.
        assert job._fit_validation(0.11, held, general, None, 40, adapter_served=False) != (held, general)
        # On 10 typed: 0.11 * (180 + 1.5 * 50) = 28.05 s: all of both sets.
        assert job._fit_validation(0.11, held, general, None, 10, adapter_served=False) == (held, general)


def test_the_time_kept_for_after_training_counts_every_answer_the_night_then_computes() -> None:
    """What the night keeps of its budget for after training (`candidate_eval_s`) and what it plans for
    validation as a whole come from one count: after training, the candidate on both sets and the
    night's adapters on the typed household utterances and the general set, and Whisper as built on the
    general set too where adapters are served (the gate compares the night's with both)."""
    before, after = validation_seconds(1.0, 40, 20, judged=10, adapter_served=True)
    assert after == 40 + 20 + 1.5 * (10 + 2 * 20)
    assert before == 40 + 20 + 1.5 * (40 + 20)  # the served projector, the served cascade
    assert validation_seconds(1.0, 40, 20, judged=10, adapter_served=False)[1] == 60 + 1.5 * 30
    assert validation_seconds(1.0, 40, 20, judged=0, adapter_served=True) == (60 + 1.5 * 40, 60)
    assert validation_seconds(1.0, 40, 20, judged=0, adapter_served=False, anchor=True)[0] == 80 + 60


def test_a_projector_that_cannot_pass_once_over_its_utterances_gives_the_adapters_its_time() -> None:
    """At real size on 2 cores the projector's half of a 10-minute night held half a pass over its 330
    utterances (5 steps, inside the learning rate's warm-up), while Whisper's decoder adapters stopped on
    the clock after 4 epochs: a night that trains adapters leaves such a projector as it is."""
    assert projector_skip(0.01, 100, 1.0) is None  # one pass fits exactly
    why = projector_skip(0.87, 330, 145.0)
    assert why == (
        "its share of the night (145 s) holds 0.51 of a pass over its 330 utterances at 0.87 s each; "
        "Whisper's decoder adapters had its time"
    )


@pytest.mark.parametrize(("household", "held"), [(60, 10), (600, EARLY_STOP_MAX)])
def test_the_utterances_that_stop_training_early_are_capped(
    tmp_path: Path, household: int, held: int
) -> None:
    """1 in 6 of the household's training utterances, and as many replayed ones, validate the training's
    loss, but not more than `EARLY_STOP_MAX` each: at real size two validations over 93 + 93 took ~190 s
    of a 387 s training; the rest train."""
    label = Label(0, "0.wav", 0.0, "turn on the fan", None, "teacher", "teacher", None)
    pairs = [(replace(label, id=i, audio_path=f"{i}.wav"), np.zeros(1)) for i in range(household)]
    replay = [Utterance(tmp_path / f"r{i}.wav", "turn off the lamp", None, "s", "base") for i in range(400)]
    job = Job(AdaptOptions(data_dir=tmp_path), conn=None)
    paths = job._manifests(pairs, replay)
    val, train = read_manifest(paths["val"]), read_manifest(paths["train"])
    assert len(val) == 2 * held and len(train) == household + 400 - 2 * held
    assert sum(u.audio.name.startswith("r") for u in val) == held


def test_a_run_waits_out_a_delete_holding_the_lock_but_not_another_run(tmp_path: Path) -> None:
    """A delete (`NightData.forget`) holds the job lock for moments: a run starting then waits for it
    rather than giving up as "busy"; a lock held by another run still says busy once the wait is over."""
    with job_lock(tmp_path) as run:
        t0 = time.monotonic()
        with job_lock(tmp_path, wait_s=0.3) as second:
            assert run and not second and time.monotonic() - t0 >= 0.3
    delete = job_lock(tmp_path)
    assert delete.__enter__()
    threading.Timer(0.3, delete.__exit__, (None, None, None)).start()
    with job_lock(tmp_path, wait_s=5.0) as waited:
        assert waited
