"""A night that adapts Whisper's decoder: promoted on the cascade's answers, stored in the version, served
by a real server over the `wyoming` client, logged with the version, and taken back by a rollback.

The micro Whisper hears real speech too poorly for its adapters to be judged on it (WER about 0.9, the
night's own gate rejects them), so the household here says one command the micro Whisper never writes,
over and over (each clip its own noise): what the adapters must learn is the household's words."""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from adaptation import bootstrap_dir
from serving import WEB, ServerProcess, client, read_until, send_audio, serve_args
from wyoming.asr import Transcribe, Transcript

from wyoming_tinyalign.adapt import (
    AdaptOptions,
    Item,
    Job,
    NightData,
    Predictions,
    answer_key,
    held_out,
    run_job,
)
from wyoming_tinyalign.audio import read_wav
from wyoming_tinyalign.intents import Intent
from wyoming_tinyalign.labels import set_correction, set_teacher, validate_correction
from wyoming_tinyalign.manifest import Utterance
from wyoming_tinyalign.model.bundle import load_bundle_config, load_projector
from wyoming_tinyalign.model.decoder_adapter import adapter_key
from wyoming_tinyalign.model.decoder_memory import DecoderMemory
from wyoming_tinyalign.model.projector import weights_key
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.store import Interaction, InteractionStore
from wyoming_tinyalign.train import FeatureCache
from wyoming_tinyalign.versions import Versions, record_model
from wyoming_tinyalign.webui import _run_row, _version_rows

PHRASE = "turn on the zebra lamp"
INTENT = Intent("HassTurnOn", {"name": "zebra lamp"})
TAUGHT = (1, 2, 5)  # rows the teacher alone labels: two training rows and a held-out one


def _clip(seed: int) -> np.ndarray:
    """A second of noise on the 16-bit grid (it reaches the server as PCM unchanged)."""
    noise = np.random.default_rng(seed).standard_normal(16000) * 0.1
    return (np.round(noise * 32768) / 32768).astype(np.float32)


def _pcm(audio: np.ndarray) -> bytes:
    return np.round(audio * 32768).astype("<i2").tobytes()


def _logged(data: Path, micro_model: Path, typed: bool = True) -> None:
    """A data dir whose log holds 40 utterances corrected to PHRASE (each its own noise clip) and one
    correction longer than the micro Whisper's decoder writes (48 tokens): learnt by the projector, left
    out of the adapters' training (row 41: a training row). The `TAUGHT` rows are not corrected: their
    label is the teacher's PHRASE (the projector learns from and is judged on them, the adapters are
    not). Not `typed`: no row is corrected, every label is the teacher's."""
    record_model(data, micro_model, "micro")
    store = InteractionStore(data / "log")
    store.open()
    try:
        for i in range(41):
            row = store.add(
                Interaction(kind="audio", created_at=time.time() - 86400 + 60 * i, client="10.0.0.9:1",
                            path="cascade", transcript="set the", duration_s=1.0),
                _clip(i),
            )  # fmt: skip
            text = PHRASE if i < 40 else " ".join([PHRASE] * 20)
            if not typed or row in TAUGHT:
                set_teacher(store.conn, row, text, -0.1)
            else:
                set_correction(
                    store.conn, row, validate_correction({"text": text, "intent": INTENT.to_json()})
                )
    finally:
        store.close()


def _options(data: Path, tmp_path_factory: pytest.TempPathFactory) -> AdaptOptions:
    return AdaptOptions(
        data_dir=data, now=True, budget_minutes=1.0, replay_n=32, general_n=16, decide_on="loss",
        decoder_lr=3e-3,  # (at 1e-3, decayed, the micro Whisper's adapters did not learn the phrase in time)
        bootstrap_dir=bootstrap_dir(tmp_path_factory), teacher_min_confidence=-0.5,
        tolerance=1.0,  # the micro Whisper's other voices are noise (WER about 1): they cannot decide
    )  # fmt: skip


@pytest.fixture(scope="module")
def night(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A data dir as `_logged` makes it, and the report of its night."""
    data = tmp_path_factory.mktemp("decoder-night") / "data"
    _logged(data, micro_model)
    return data, run_job(_options(data, tmp_path_factory))


def test_the_night_promotes_adapters_that_hear_the_household(
    night: tuple[Path, dict], micro_model: Path
) -> None:
    data, report = night
    decoder = report["decoder"]
    assert decoder["promoted"] and decoder["steps"] > 0, report["reason"]
    assert report["status"] == "promoted" and "decoder: better for the household" in report["reason"]
    before, after = report["cascade"]["household"], decoder["after"]["household"]
    assert after["wer"] < before["wer"]  # (the micro LLM makes no intent of the words either way)
    # The teacher's labels teach the projector, not the adapters (the words are Whisper's own), nor
    # judge them.
    assert [held_out(row, AdaptOptions.heldout_every) for row in TAUGHT] == [False, False, True]
    assert report["data"]["sources"] == {"correction": 38, "teacher": 3, "outcome": 0}
    assert decoder["examples"]["household"] == report["data"]["train"] - 2
    assert decoder["after"]["household"]["n"] == report["data"]["heldout_evaluated"] - 1
    assert decoder["examples"]["replay"] > 0
    assert decoder["examples"]["too_long"] == 1

    versions = Versions(data)
    name = report["version"]
    assert versions.current() == name
    adapter = versions.adapter(name)
    assert adapter is not None
    # With them, the memory of the transcripts they learnt (all PHRASE but the one too long to learn) and
    # of the corrections held out to judge them, marked as judging nights.
    model = SpeechLLM.load(micro_model)
    memory = DecoderMemory.of(adapter[0])
    n_tokens = len(model.whisper_tokenizer(PHRASE, add_special_tokens=False)["input_ids"])
    assert memory is not None
    held = report["data"]["heldout_sources"]["correction"]
    judges = {key for _, key in _corrected(data, held=True)}
    assert memory.judges == judges and set(memory.clips) == judges | {key for _, key in _corrected(data)}
    assert len(judges) == held >= decoder["after"]["household"]["n"] > 0
    assert decoder["memory"] == {
        "transcripts": len(memory.clips), "held_out": held, "states": len(memory.values)
    }  # fmt: skip
    assert len(memory.clips) == decoder["examples"]["household"] - 1 + held
    assert len(memory.values) == len(memory.clips) * (n_tokens + 1)
    # The next night judges the cascade it serves as this one judged its candidate: without them.
    with sqlite3.connect(":memory:") as conn:
        job = Job(AdaptOptions(data_dir=data), conn)
        job.report["serving_version"] = name
        job._serve_decoder_adapter(model)
    assert model.decoder_memory is not None and not model.decoder_memory.judges
    assert set(model.decoder_memory.clips) == set(memory.clips) - memory.judges
    # ... so the cascade's answers this night cached for them are kept for it (not pruned as unused).
    served_key = adapter_key(model.decoder_adapter[0])
    assert any(served_key in p.name for p in (data / "adapt" / "predictions").glob("cascade-*.json"))
    # The version's cascade figures are the adapters', and `--path auto` reads the aligned path against
    # the cascade with them, utterance by utterance, on the same held-out set.
    metrics = versions.info(name).metrics
    assert metrics["cascade"]["household"] == after
    assert 0 < sum(metrics["aligned_vs_cascade"]["wer"]) <= after["n"]
    assert metrics["aligned_beats_cascade"] is (report["path_auto"] == "aligned")
    model.set_decoder_adapter(*adapter)
    assert model.run(_clip(1000), "cascade", with_intent=False).transcript == PHRASE

    # What answered the household before the night and what answers after it, on either path: the
    # version's figures after; the served cascade before on the set its adapters were judged on.
    served = report["served"]
    assert served["path_auto"] == {"before": "cascade", "after": report["path_auto"]}
    assert served["cascade"] == {"before": decoder["before"], "after": decoder["after"]}
    assert decoder["before"]["household"]["n"] == after["n"] < report["cascade"]["household"]["n"]
    assert served["aligned"]["before"] == report["before"]
    assert served["aligned"]["after"]["household"] == metrics["household"]
    # The household's page shows them for the path the server serves (the reason says what the night
    # did), here with `--path cascade` and `--path aligned`.
    run = {"report": report, "status": report["status"], "reason": report["reason"], "started_at": 0.0}
    for path in ("cascade", "aligned"):
        row = _run_row({**run, "finished_at": 1.0}, {name}, path)
        wer = [f"{served[path][when]['household']['wer'] * 100:.0f}%" for when in ("before", "after")]
        assert f"{wer[0]} &rarr; {wer[1]}" in row and f'<div class="small">{path}</div>' in row, row
    # And the kept versions, each on the path it would answer on.
    listing = versions.describe()
    remembered = decoder["memory"]["transcripts"]
    assert listing["versions"][0]["path_auto"] == report["path_auto"]
    assert listing["versions"][0]["remembers"] == remembered > 0
    adapters = f"and Whisper decoder adapters, remembering {remembered} corrected transcripts"
    assert adapters in _version_rows(listing, name, "cascade")
    for path, figures in (("cascade", metrics["cascade"]), ("aligned", metrics)):
        rows = _version_rows(listing, name, path)
        cell = f'{figures["household"]["intent_accuracy"] * 100:.0f}%<div class="small">{path}</div>'
        assert cell in rows and f'<td data-label="WER">{figures["household"]["wer"] * 100:.0f}%</td>' in rows


def test_a_night_on_the_teachers_labels_alone_trains_no_decoder_adapters(
    night: tuple[Path, dict], micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The teacher's words are the served cascade's own: adapters judged against them can only come out
    worse, so a night without a corrected transcript trains none, says why, and gives the projector
    the time they would have had."""
    data = tmp_path_factory.mktemp("teacher-night") / "data"
    _logged(data, micro_model, typed=False)
    report = run_job(_options(data, tmp_path_factory))
    assert report["data"]["sources"] == {"correction": 0, "teacher": 41, "outcome": 0}
    skipped = "it learns from transcripts the household corrected, and there are 0 to learn"
    assert report["decoder"]["promoted"] is False and report["decoder"]["skipped"].startswith(skipped)
    assert set(report["decoder"]) == {"skipped", "promoted"}  # (nothing trained, nothing judged)
    assert f"decoder: not trained: {skipped}" in report["reason"]
    assert report["train"]["budget_s"] > 1.5 * night[1]["train"]["budget_s"]  # (half went to the adapters)
    # What the night kept, if anything (its projector, unless no epoch beat the served one: that
    # turns on the replay sample, drawn from a hash that holds the model's path), has no adapters.
    kept = report.get("version")
    assert kept is None or Versions(data).adapter(kept) is None
    run = {"report": report, "status": report["status"], "reason": report["reason"], "started_at": 0.0}
    page_row = _run_row({**run, "finished_at": 1.0}, set(), "auto")  # (as the household's page lists it)
    assert "Whisper's decoder (not trained): it learns from transcripts the household corrected" in page_row


def test_a_projector_its_share_cannot_train_once_gives_the_adapters_its_time(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Held to a few seconds, the night times a training step on the served projector, finds that its
    share cannot pass once over its utterances, and gives that share and its validation's to the
    adapters; the version it writes carries the served projector unchanged."""
    data = tmp_path_factory.mktemp("decoder-night-alone") / "data"
    _logged(data, micro_model)
    report = run_job(replace(_options(data, tmp_path_factory), budget_minutes=0.01))
    skipped = report["train"]["skipped"]
    assert skipped.startswith("its share of the night (0 s) holds 0.")
    assert set(report["train"]) == {"skipped", "budget_s"}  # (nothing trained, nothing validated)
    assert f"projector: not trained: {skipped}; decoder: " in report["reason"]
    assert report["decoder"]["budget_s"] > 2 * report["train"]["budget_s"]  # (its half, the other, more)
    assert report["decoder"]["steps"] > 0 and report["after"] == report["before"], report
    # The night's version (kept or on record) pairs its adapters with the projector it served.
    projector, _ = Versions(data).load(report["version"])
    shipped, _ = load_projector(micro_model / load_bundle_config(micro_model).projector)
    assert weights_key(projector) == weights_key(shipped)


def _serve(data: Path, micro_model: Path, tmp_path: Path) -> tuple[ServerProcess, str, str]:
    """A server on `data` answering on the cascade (no nights), ready; its web address and token."""
    extra = ["--uri", "tcp://127.0.0.1:0", "--path", "cascade", "--web-port", "0", "--adapt-at", "off"]
    process = ServerProcess(serve_args(micro_model, data, *extra), tmp_path / "server.log")
    try:
        process.wait_ready()
        return process, process.wait_log(WEB).group(1), (data / "web-token").read_text().strip()
    except BaseException:
        process.stop()
        raise


async def _say(process: ServerProcess, seed: int) -> str:
    """What the server heard in `_clip(seed)`, sent as a satellite does."""
    async with client(*process.host_port) as c:
        await c.write_event(Transcribe(language="en").event())
        await send_audio(c, _pcm(_clip(seed)), 16000)
        return Transcript.from_event((await read_until(c, "transcript"))[-1]).text


async def test_the_server_serves_them_logs_the_version_and_a_rollback_takes_them_back(
    night: tuple[Path, dict], micro_model: Path, tmp_path: Path
) -> None:
    data, report = night
    name = report["version"]
    before = SpeechLLM.load(micro_model).run(_clip(2000), "cascade", with_intent=False).transcript
    assert before != PHRASE
    process, web, token = _serve(data, micro_model, tmp_path)
    try:
        assert await _say(process, 2000) == PHRASE
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            rows = await (await http.get(f"{web}/api/interactions")).json()
            newest = rows["items"][0]
            assert newest["path"] == "cascade" and newest["projector_version"] == name
            page = await (await http.get(f"{web}/learning")).text()  # the household's page says so
            assert "Whisper's decoder (kept)" in page and "and Whisper decoder adapters" in page
            assert "1 transcript longer than it writes left out" in page
            remembered = report["decoder"]["memory"]["transcripts"]
            assert f"remembering {remembered} corrected transcripts" in page
            dashboard = await (await http.get(f"{web}/")).text()
            assert f"{name}, with Whisper decoder adapters, promoted" in dashboard
            answer = await http.post(f"{web}/api/rollback", json={"to": "base"})
            assert answer.status == 200, await answer.text()
            dashboard = await (await http.get(f"{web}/")).text()
            assert "the model's own projector" in dashboard
            assert "with Whisper decoder adapters" not in dashboard
        assert await _say(process, 2000) == before
    finally:
        process.stop()
    assert "with Whisper decoder adapters" in process.text


def _corrected(data: Path, held: bool = False) -> list[tuple[int, str]]:
    """The rows `_logged` corrected to PHRASE on one side of the night's split, with their clips' keys:
    those its adapters learn from, or (`held`) those held out to judge them. Its memory keeps both."""
    with closing(sqlite3.connect(data / "log" / "interactions.sqlite3")) as db:
        return [
            (row, FeatureCache.key(read_wav(data / "log" / audio)))
            for row, audio in db.execute("SELECT id, audio_path FROM interactions ORDER BY id")
            if row <= 40 and row not in TAUGHT and held_out(row, AdaptOptions.heldout_every) == held
        ]


def _forgotten(process: ServerProcess, times: int) -> None:
    """Wait until the server's log says its memory forgot one recording's words `times` times."""
    process.wait_log(re.compile(rf"(the served memory forgot the words of 1 recording\b[\s\S]*){{{times}}}"))


async def test_a_deleted_recording_or_correction_leaves_the_served_memory_and_every_versions(
    night: tuple[Path, dict], micro_model: Path, tmp_path: Path
) -> None:
    """The memory's tokens are the household's words: a recording deleted through the API, or a
    correction changed to other words or removed, takes the clip's states out of the memory the server
    serves (before its next answer) and out of the version file; a correction given again in the same
    words keeps them. Deleting all recordings leaves the version its adapters, no memory."""
    data = tmp_path / "data"
    shutil.copytree(night[0], data)  # (the night's data dir stays as the other tests read it)
    name = night[1]["version"]
    versions = Versions(data)
    versions.promote(name)  # (served again: an earlier test rolled back to the bundle's)
    memory = DecoderMemory.of(versions.adapter(name)[0])
    assert memory is not None
    rows, keys = zip(*_corrected(data)[:4], strict=True)
    assert memory.holds(set(keys))

    def remembered() -> set[str]:
        left = DecoderMemory.of(versions.adapter(name)[0])
        assert left is not None
        assert len(left.values) == len(memory.values) // len(memory.clips) * len(left.clips)
        return set(left.clips)

    process, web, token = _serve(data, micro_model, tmp_path)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            url = f"{web}/api/interactions"
            same = {"text": PHRASE, "intent": INTENT.to_json()}
            assert (await http.put(f"{url}/{rows[0]}/correction", json=same)).status == 200
            assert remembered() == set(memory.clips)
            other = {"text": "turn on the zebra light"}
            assert (await http.put(f"{url}/{rows[1]}/correction", json=other)).status == 200
            assert remembered() == set(memory.clips) - {keys[1]}
            _forgotten(process, 1)
            assert (await http.delete(f"{url}/{rows[2]}/correction")).status == 204
            assert remembered() == set(memory.clips) - {keys[1], keys[2]}
            _forgotten(process, 2)
            assert (await http.delete(f"{url}/{rows[3]}")).status == 204
            assert remembered() == set(memory.clips) - set(keys[1:])
            _forgotten(process, 3)
            listing = await (await http.get(f"{web}/api/versions")).json()
            assert listing["versions"][0]["remembers"] == len(memory.clips) - 3
            assert (await http.delete(url)).status == 200
        stored = versions.adapter(name)
        assert stored is not None and DecoderMemory.of(stored[0]) is None
        assert await _say(process, 2000) == PHRASE  # the adapters alone still hear the household's words
    finally:
        process.stop()
    assert process.text.count("the served memory forgot the words of") == 4


class _Meanwhile(logging.Handler):
    """Does `act` on the interaction log as the API does (what nights derived from a clip follows it) the
    moment the night logs a line that starts with `when`; keeps what it returned in `done`."""

    def __init__(self, data: Path, when: str, act: Callable[[InteractionStore], object]) -> None:
        super().__init__()
        self.data, self.when, self.act = data, when, act
        self.done: object = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.done is not None or not record.getMessage().startswith(self.when):
            return
        store = InteractionStore(self.data / "log", derived=NightData(self.data))
        store.open()
        try:
            self.done = self.act(store)
        finally:
            store.close()


def _night_meanwhile(handler: _Meanwhile, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The report of a night on `handler.data`, with `handler` acting as the night logs."""
    logger = logging.getLogger("wyoming_tinyalign.adapt")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return run_job(_options(handler.data, tmp_path_factory))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _delete_all(store: InteractionStore) -> int:
    return store.delete([row for (row,) in store.conn.execute("SELECT id FROM interactions")])


@pytest.mark.parametrize(
    "when", ["training Whisper's decoder adapters", "Whisper's decoder adapters:"], ids=["training", "judged"]
)
def test_adapters_that_learnt_from_recordings_deleted_meanwhile_are_not_kept(
    when: str, micro_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Deleted while the adapters train (their features go too: the feature cache computes them again)
    or once they are judged (promotable): the night keeps nothing, its report does not say the adapters
    were kept, and no feature of a deleted clip is left."""
    data = tmp_path_factory.mktemp("decoder-night-deleted") / "data"
    _logged(data, micro_model)
    handler = _Meanwhile(data, when, _delete_all)
    report = _night_meanwhile(handler, tmp_path_factory)
    assert handler.done == 41
    assert report["status"] == "rejected" and "deleted while it ran: " in report["reason"], report
    decoder = report["decoder"]
    assert decoder["steps"] > 0 and decoder["promoted"] is False, decoder
    if when.endswith(":"):  # judged better: what 41a88d8 mended
        assert "better for the household" in decoder["reason"]
    assert "version" not in report and Versions(data).names() == []
    keys = {FeatureCache.key(_clip(i)) for i in range(41)}
    cached = {path.stem for path in (data / "cache" / "features").rglob("*.safetensors")}
    assert cached and not keys & cached  # (the other voices' features stay)


def test_a_correction_changed_while_the_night_ran_is_not_remembered(
    micro_model: Path, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A correction given other words once the night has built its memory (a server forgets the clip's
    states in the memory it serves at once): the version the night keeps does not remember them, and
    remembers the other corrections."""
    data = tmp_path_factory.mktemp("decoder-night-recorrected") / "data"
    _logged(data, micro_model)
    learnt = _corrected(data)
    row, key = learnt[0]
    other = validate_correction({"text": "turn on the zebra light"})
    handler = _Meanwhile(data, "Whisper's decoder adapters:", lambda store: store.correct(row, other))
    report = _night_meanwhile(handler, tmp_path_factory)
    assert handler.done is True
    assert report["status"] == "promoted" and report["decoder"]["promoted"] is True, report
    stored = Versions(data).adapter(report["version"])
    memory = DecoderMemory.of(stored[0]) if stored is not None else None
    remembered = {k for _, k in learnt + _corrected(data, held=True)}
    assert memory is not None and set(memory.clips) == remembered - {key}
    assert "forgot the remembered words of 1 clip corrected again while this run ran" in caplog.text


def test_the_adapters_are_judged_on_what_the_budget_leaves(micro_model: Path, tmp_path: Path) -> None:
    """What judging the adapters costs is what they make Whisper write, unknown until they are trained
    (at real size, random weights' adapters took about 4 s an answer, the served cascade 0.1-0.15 s, and
    the night ran past its budget). The night times their first answer and cuts the sets it judges them
    on (general first, neither below 8) so that their answers end within its budget."""
    model = SpeechLLM.load(micro_model)
    utterance = Utterance(tmp_path / "x.wav", PHRASE, INTENT, "s", "zebra")
    clips = [_clip(3000 + i) for i in range(28)]
    items = [Item(f"c{i}", a, model.encode(a), utterance, "") for i, a in enumerate(clips)]
    sets = {"household": items[:12], "general": items[12:]}
    cache = Predictions(tmp_path, "cascade-adapters")
    with sqlite3.connect(":memory:") as conn:
        job = Job(AdaptOptions(data_dir=tmp_path, budget_minutes=1.0), conn)
        assert job._fit_decoder_validation(model, sets, cache, built=True) == sets  # time enough
        assert len(cache.data) == 1  # (the answer timed is kept: it is not computed again)
        job.start = time.monotonic() - 60  # the budget is spent
        cut = job._fit_decoder_validation(model, sets, cache, built=True)
    assert cut == {"household": items[:8], "general": items[12:20]}
    assert len(cache.data) == 2
    # Answers already known cost nothing: nothing is timed, nothing cut.
    cache.data = {answer_key(it): ["", None] for it in items}
    assert job._fit_decoder_validation(model, sets, cache, built=True) == sets
