import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from wyoming_tinyalign.audio import (
    TARGET_RATE,
    AudioError,
    decode_wav,
    float_to_pcm16,
    pcm_to_float,
    read_wav,
    write_wav,
)

_FLOAT_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def _sine(rate: int, seconds: float = 1.0, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def _wav_bytes(samples: np.ndarray, rate: int, kind: str, extensible: bool = False) -> bytes:
    """A WAV built by hand (not with the code under test): samples is (frames, channels) in [-1, 1]."""
    channels = samples.shape[1]
    if kind == "u8":
        data, tag, width = np.round(samples * 127 + 128).astype(np.uint8).tobytes(), 1, 1
    elif kind == "s16":
        data, tag, width = np.round(samples * 32767).astype("<i2").tobytes(), 1, 2
    elif kind == "s24":
        ints = np.round(samples * (2**23 - 1)).astype("<i4").reshape(-1, 1).view(np.uint8)
        data, tag, width = ints.reshape(-1, 4)[:, :3].tobytes(), 1, 3
    elif kind == "s32":
        data, tag, width = np.round(samples * (2**31 - 1)).astype("<i4").tobytes(), 1, 4
    else:
        data, tag, width = samples.astype("<f4").tobytes(), 3, 4
    align = width * channels
    common = struct.pack("<HIIHH", channels, rate, rate * align, align, width * 8)
    if extensible:
        fmt = struct.pack("<H", 0xFFFE) + common + struct.pack("<HHI", 22, width * 8, 0)
        fmt += struct.pack("<H", tag) + _FLOAT_GUID_TAIL
    else:
        fmt = struct.pack("<H", tag) + common
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", 3) + b"abc\0"  # odd-sized chunk with its pad byte
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def _dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum) * TARGET_RATE / len(audio))


@pytest.mark.parametrize(
    ("rate", "channels", "kind", "extensible"),
    [
        (22050, 2, "s16", False),
        (8000, 1, "u8", False),
        (44100, 1, "s24", False),
        (48000, 1, "f32", False),
        (48000, 1, "s32", False),
        (32000, 2, "f32", True),
        (16000, 6, "s16", True),
    ],
)
def test_read_wav_formats(tmp_path: Path, rate: int, channels: int, kind: str, extensible: bool) -> None:
    samples = np.repeat(_sine(rate)[:, None], channels, axis=1)
    path = tmp_path / "in.wav"
    path.write_bytes(_wav_bytes(samples, rate, kind, extensible))
    audio = read_wav(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - TARGET_RATE) <= 0.01 * TARGET_RATE
    assert abs(_dominant_hz(audio) - 440) <= 2
    assert 0.45 <= np.max(np.abs(audio)) <= 0.55  # channels are averaged, not summed


def test_stdlib_wave_agrees_for_pcm16(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    pcm = float_to_pcm16(_sine(16000, 0.5))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm)
    np.testing.assert_array_equal(read_wav(path), np.frombuffer(pcm, "<i2") / np.float32(32768))


def test_streaming_header_reads_to_end_of_file() -> None:
    data = bytearray(_wav_bytes(_sine(22050, 0.5)[:, None], 22050, "s16"))
    pos = bytes(data).index(b"data") + 4
    data[pos : pos + 4] = struct.pack("<I", 0x7FFFF000)  # what espeak-ng --stdout writes
    assert abs(len(decode_wav(bytes(data))) - 8000) <= 80


@pytest.mark.parametrize(
    "content",
    [b"", b"RIFF", b"garbage that is not a wav file at all", "truncated"],
)
def test_bad_wav_raises_naming_file(tmp_path: Path, content: bytes | str) -> None:
    if content == "truncated":
        content = _wav_bytes(_sine(16000)[:, None], 16000, "s16")[:30]
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match="broken.wav"):
        read_wav(path)


def test_missing_file_raises_audio_error(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="nope.wav"):
        read_wav(tmp_path / "nope.wav")


def test_unsupported_format_raises() -> None:
    data = bytearray(_wav_bytes(_sine(16000, 0.1)[:, None], 16000, "s16"))
    data[20:22] = struct.pack("<H", 2)  # ADPCM
    with pytest.raises(AudioError, match="format tag 2"):
        decode_wav(bytes(data), "adpcm.wav")


@pytest.mark.parametrize(
    ("rate", "width", "channels"), [(16000, 2, 1), (22050, 1, 2), (44100, 3, 1), (8000, 4, 2)]
)
def test_write_wav_round_trip(tmp_path: Path, rate: int, width: int, channels: int) -> None:
    path = tmp_path / "out.wav"
    write_wav(path, _sine(TARGET_RATE).astype(np.float32), rate=rate, width=width, channels=channels)
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (rate, width, channels)
        assert abs(wav.getnframes() - rate) <= 0.01 * rate
    audio = read_wav(path)
    assert abs(len(audio) - TARGET_RATE) <= 0.01 * TARGET_RATE
    assert abs(_dominant_hz(audio) - 440) <= 2
    assert 0.45 <= np.max(np.abs(audio)) <= 0.55
    assert [p.name for p in tmp_path.iterdir()] == ["out.wav"]  # no temporary file left behind


def test_pcm_conversions() -> None:
    assert float_to_pcm16(np.array([2.0, -2.0, 0.0])) == struct.pack("<3h", 32767, -32767, 0)
    stereo = struct.pack("<4h", 16384, 16384, -8192, 8192)
    np.testing.assert_allclose(pcm_to_float(stereo, 16000, 2, 2), [0.5, 0.0])
    assert pcm_to_float(bytes([128, 255, 0]), 16000, 1, 1)[0] == 0.0
    with pytest.raises(ValueError, match="whole number"):
        pcm_to_float(b"\0\0\0", 16000, 2, 1)
