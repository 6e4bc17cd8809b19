"""Synthetic households: who speaks (espeak-ng voices) and what there is to control (devices, areas).

The packaged ``data/households.json`` holds "base" households (the development model trains on them)
and "unseen" ones with voices, accents and device names the base never uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .model import prompt

DOMAINS = ("light", "switch", "fan", "cover", "lock", "climate", "media_player")
MAX_NAME_WORDS = 3

T = TypeVar("T")
_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NAME = re.compile(r"[a-z0-9']+( [a-z0-9']+)*")


@dataclass
class Speaker:
    """An espeak-ng voice (e.g. ``en-us+f3``, or ``de`` reading English) at a speed and pitch."""

    id: str
    voice: str
    speed: int  # words per minute
    pitch: int  # 0-99
    noise_snr_db: float | None  # white noise at this SNR; None = clean


@dataclass
class Device:
    name: str
    domain: str
    area: str


@dataclass
class Household:
    name: str
    split: str
    speakers: list[Speaker]
    devices: list[Device]
    areas: list[str]


def load_households(path: Path | None = None) -> list[Household]:
    """Load households from a JSON file (None = the packaged ``data/households.json``)."""
    if path is None:
        source = "data/households.json"
        text = resources.files("wyoming_tinyalign").joinpath(source).read_text(encoding="utf-8")
    else:
        source, text = str(path), Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        households = _each(data, "households", "", _household)
        if not households:
            raise ValueError("households: empty")
        _check_unique([h.name for h in households], "households[].name")
        _check_unique([s.id for h in households for s in h.speakers], "households[].speakers[].id")
    except ValueError as err:  # json.JSONDecodeError is a ValueError too
        raise ValueError(f"{source}: {err}") from err
    return households


def context_text(household: Household) -> str:
    """The household's context for the LLM prompt (see `prompt.context_text`)."""
    return prompt.context_text(household.areas, [d.name for d in household.devices])


def _household(data: Any, where: str) -> Household:
    name = _get(data, "name", str, where)
    if not _SLUG.fullmatch(name):
        raise ValueError(f"{where}.name: {name!r} is not a lowercase slug (a-z, 0-9, '-', '_')")
    areas = _each(data, "areas", where, _name)
    _check_unique(areas, f"{where}.areas")
    devices = _each(data, "devices", where, lambda d, at: _device(d, at, areas))
    _check_unique([d.name for d in devices], f"{where}.devices[].name")
    speakers = _each(data, "speakers", where, _speaker)
    return Household(name, _get(data, "split", str, where), speakers, devices, areas)


def _speaker(data: Any, where: str) -> Speaker:
    voice = _get(data, "voice", str, where)
    if not voice or " " in voice:
        raise ValueError(f"{where}.voice: {voice!r} is not an espeak-ng voice name")
    speed, pitch = _get(data, "speed", int, where), _get(data, "pitch", int, where)
    if not 80 <= speed <= 450:
        raise ValueError(f"{where}.speed: {speed} is outside 80-450 words per minute")
    if not 0 <= pitch <= 99:
        raise ValueError(f"{where}.pitch: {pitch} is outside 0-99")
    snr = data.get("noise_snr_db")
    if snr is not None and (isinstance(snr, bool) or not isinstance(snr, int | float)):
        raise ValueError(f"{where}.noise_snr_db: expected a number or null, got {snr!r}")
    return Speaker(_get(data, "id", str, where), voice, speed, pitch, None if snr is None else float(snr))


def _device(data: Any, where: str, areas: list[str]) -> Device:
    domain, area = _get(data, "domain", str, where), _get(data, "area", str, where)
    if domain not in DOMAINS:
        raise ValueError(f"{where}.domain: {domain!r} is not one of {', '.join(DOMAINS)}")
    if area not in areas:
        raise ValueError(f"{where}.area: {area!r} is not in the household's areas")
    return Device(_name(_get(data, "name", str, where), f"{where}.name"), domain, area)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value.split()) > MAX_NAME_WORDS:
        raise ValueError(
            f"{where}: {value!r} is not a lowercase name of 1-{MAX_NAME_WORDS} words (a-z, 0-9, ')"
        )
    return value


def _each(data: Any, key: str, where: str, parse: Callable[[Any, str], T]) -> list[T]:
    """Parse each item of the list ``data[key]``, naming it ``where.key[i]`` in errors."""
    field = f"{where}.{key}" if where else key
    return [parse(item, f"{field}[{i}]") for i, item in enumerate(_get(data, key, list, where))]


def _get(data: Any, key: str, kind: type, where: str) -> Any:
    field = f"{where}.{key}" if where else key
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{field}: missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{field}: expected {kind.__name__}, got {value!r}")
    return value


def _check_unique(values: list[str], where: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{where}: duplicate {value!r}")
        seen.add(value)
