import argparse
import dataclasses
import json
import logging
import random
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from wyoming_tinyalign.audio import TARGET_RATE, read_wav
from wyoming_tinyalign.devmodel import CROWD_LANGUAGES, CROWD_VARIANTS, crowd_households
from wyoming_tinyalign.households import Household, load_households
from wyoming_tinyalign.intents import Intent
from wyoming_tinyalign.manifest import load_utterances, read_manifest
from wyoming_tinyalign.synth import add_synth_args, render_corpus, run_synth

N = 12


@pytest.fixture(scope="module")
def households() -> list[Household]:
    by_name = {h.name: h for h in load_households()}
    return [by_name["maple"], by_name["harbour"]]  # a base household and an unseen one with noise


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, households: list[Household]) -> Path:
    return render_corpus(tmp_path_factory.mktemp("a"), households, N, seed=5)


def _files(manifest: Path) -> dict[str, bytes]:
    root = manifest.parent
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_packaged_voices_exist() -> None:
    for household in load_households():
        for speaker in household.speakers:
            proc = subprocess.run(
                ["espeak-ng", "-v", speaker.voice, "-q", "test"], capture_output=True, text=True, check=False
            )
            assert proc.returncode == 0 and not proc.stderr, (speaker.voice, proc.stderr)


def test_crowd_voices_exist_and_leave_the_unseen_households_unheard() -> None:
    """The dev Whisper's crowd speaks in voices espeak-ng has, none of an `unseen` household's language."""
    for voice in {lang + variant for lang in CROWD_LANGUAGES for variant in CROWD_VARIANTS}:
        proc = subprocess.run(
            ["espeak-ng", "-v", voice, "-q", "test"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0 and not proc.stderr, (voice, proc.stderr)
    unseen = {s.voice.split("+")[0] for h in load_households() if h.split == "unseen" for s in h.speakers}
    crowd = crowd_households(50, random.Random(0))
    assert {s.voice.split("+")[0] for h in crowd for s in h.speakers} <= set(CROWD_LANGUAGES)
    assert not unseen & set(CROWD_LANGUAGES)
    assert len({s.voice for h in crowd for s in h.speakers}) > 50  # a crowd, not a handful


def test_deterministic(tmp_path: Path, corpus: Path, households: list[Household]) -> None:
    again = render_corpus(tmp_path / "b", households, N, seed=5, jobs=1)
    assert _files(again) == _files(corpus)
    other = render_corpus(tmp_path / "c", households, N, seed=6)
    assert other.read_bytes() != corpus.read_bytes()


def test_manifest_schema(corpus: Path, households: list[Household]) -> None:
    lines = corpus.read_text().splitlines()
    assert len(lines) == N
    speakers = {h.name: {s.id: s for s in h.speakers} for h in households}
    for line in lines:
        row = json.loads(line)
        assert list(row) == ["audio", "text", "intent", "speaker", "household"]
        assert row["audio"] == f"wavs/{row['household']}/{row['audio'][-9:]}"
        assert row["speaker"] in speakers[row["household"]]
        assert Intent.from_json(row["intent"]).to_json() == row["intent"]
        audio = read_wav(corpus.parent / row["audio"])
        assert 0.5 <= len(audio) / TARGET_RATE <= 8
        assert np.abs(audio).max() > 0.1
    assert [u.text for u in read_manifest(corpus)] == [json.loads(line)["text"] for line in lines]
    assert {u.household for u in read_manifest(corpus)} == {"maple", "harbour"}


def test_padding_and_noise(corpus: Path, households: list[Household]) -> None:
    snr = {s.id: s.noise_snr_db for h in households for s in h.speakers}
    for utt, audio in load_utterances(corpus):
        lead = audio[:800]  # the first 50 ms are always padding
        if snr[utt.speaker] is None:
            assert not lead.any()
        else:
            assert np.std(lead) > 1e-4


def test_cli_odd_format_reads_back(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_synth_args(parser)
    out = tmp_path / "odd"
    args = [
        "--out",
        str(out),
        "--split",
        "base",
        "--n",
        "3",
        "--rate",
        "22050",
        "--channels",
        "2",
        "--width",
        "1",
    ]
    assert run_synth(parser.parse_args(args)) == 0
    loaded = load_utterances(out / "manifest.jsonl")
    assert len(loaded) == 3
    for utt, audio in loaded:
        with wave.open(str(utt.audio)) as wav:
            assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (22050, 1, 2)
            seconds = wav.getnframes() / 22050
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) / TARGET_RATE - seconds) < 0.01 * seconds
        assert np.abs(audio).max() > 0.1


def test_load_skips_missing_and_corrupt(
    tmp_path: Path, corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = corpus.read_text().splitlines(keepends=True)
    manifest = tmp_path / "manifest.jsonl"
    (tmp_path / "wavs").symlink_to(corpus.parent / "wavs")
    rows = [json.loads(line) for line in lines]
    rows[0]["audio"], rows[1]["audio"] = "wavs/gone.wav", "corrupt.wav"
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING):
        loaded = load_utterances(manifest)
    assert len(loaded) == N - 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "gone.wav" in warnings[0] and "corrupt.wav" in warnings[1]


def test_bad_manifest_line_names_line(tmp_path: Path, corpus: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(corpus.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl:2:"):
        read_manifest(manifest)


def test_a_stop_in_a_large_render_waits_only_for_the_clips_in_hand(tmp_path: Path) -> None:
    """Ctrl-C (or the server's SIGTERM, raised the same way) once the first clip of 20 000 is written:
    the render ends within seconds, the clips being spoken finished, no others begun. The signal comes
    from another thread, which may be the one that catches it (about one stop in four here, by the
    stop's delay): the render's wait must notice it all the same (a plain `join` missed it 2 times in 10;
    the thread pool used before could deadlock in its own locks)."""
    code = """
import os, signal, sys, threading, time
from pathlib import Path
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.synth import render_corpus
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with it ignored
out = Path(sys.argv[1])
sent = []
def stop_after_the_first_clip():
    while not any(out.glob("wavs/*/*.wav")):
        time.sleep(0.005)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=stop_after_the_first_clip, daemon=True).start()
try:
    render_corpus(out, load_households(), 20000, 0)
except KeyboardInterrupt:
    print(f"stopped after {time.monotonic() - sent[0]:.2f} s")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.startswith("stopped after "), proc.stdout + proc.stderr
    assert float(proc.stdout.split()[2]) < 10
    assert len(list(tmp_path.rglob("*.wav"))) < 50  # 20 000 were planned; 2 threads each had one in hand


def test_a_failing_voice_stops_the_render_with_its_error(tmp_path: Path, households: list[Household]) -> None:
    broken = dataclasses.replace(households[0].speakers[0], voice="zz")
    household = dataclasses.replace(households[0], speakers=[*households[0].speakers, broken])
    with pytest.raises(RuntimeError, match="espeak-ng failed for voice 'zz'"):
        render_corpus(tmp_path, [household], 400, seed=1)
    assert len(list(tmp_path.rglob("*.wav"))) < 50  # the other thread stopped too, not the 400 spoken
    assert not (tmp_path / "manifest.jsonl").exists()
