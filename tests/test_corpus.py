import json
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from wyoming_tinyalign.corpus import MAX_WORDS, SWITCHABLE, generate_commands, random_household
from wyoming_tinyalign.devmodel import number_words, spoken
from wyoming_tinyalign.households import Household, context_text, load_households
from wyoming_tinyalign.intents import INTENT_SLOTS, parse_intent

_TEXT = re.compile(r"[a-z0-9']+( [a-z0-9']+)*")


def _voice_base(voice: str) -> str:
    return voice.split("+")[0]


def test_packaged_households() -> None:
    households = load_households()
    splits = Counter(h.split for h in households)
    assert splits == {"base": 3, "unseen": 3}
    for h in households:
        assert 2 <= len(h.speakers) <= 3
        assert 8 <= len(h.devices) <= 14
        assert 4 <= len(h.areas) <= 6
    base_voices = {_voice_base(s.voice) for h in households if h.split == "base" for s in h.speakers}
    unseen_voices = {_voice_base(s.voice) for h in households if h.split == "unseen" for s in h.speakers}
    assert base_voices.isdisjoint(unseen_voices)
    assert not any(v.startswith("mb-") for v in base_voices | unseen_voices)
    names = [{d.name for d in h.devices} for h in households]
    assert any(a & b for i, a in enumerate(names) for b in names[i + 1 :])  # some names shared


def test_context_text() -> None:
    household = load_households()[0]
    text = context_text(household)
    assert text.startswith("areas: ") and "; devices: " in text
    areas, devices = text.removeprefix("areas: ").split("; devices: ")
    assert areas.split(", ") == sorted(household.areas)
    assert devices.split(", ") == sorted(d.name for d in household.devices)


def _write(path: Path, households: list[dict]) -> Path:
    path.write_text(json.dumps({"households": households}))
    return path


def test_bad_households_file_names_the_field(tmp_path: Path) -> None:
    good = asdict(load_households()[0])
    bad_speed = json.loads(json.dumps(good))
    bad_speed["speakers"][1]["speed"] = "fast"
    with pytest.raises(ValueError, match=r"bad\.json: households\[0\]\.speakers\[1\]\.speed"):
        load_households(_write(tmp_path / "bad.json", [bad_speed]))
    bad_area = json.loads(json.dumps(good))
    bad_area["devices"][2]["area"] = "moon"
    with pytest.raises(ValueError, match=r"households\[1\]\.devices\[2\]\.area: 'moon'"):
        load_households(_write(tmp_path / "bad.json", [good, bad_area]))
    missing = {k: v for k, v in good.items() if k != "devices"}
    with pytest.raises(ValueError, match=r"households\[0\]\.devices: missing"):
        load_households(_write(tmp_path / "bad.json", [missing]))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        load_households(tmp_path / "broken.json")


def _sample_households() -> list[Household]:
    rng = random.Random(7)
    return load_households() + [random_household(rng) for _ in range(30)]


def test_commands_are_consistent() -> None:
    seen: Counter[str] = Counter()
    for household in _sample_households():
        domains = {d.name: d.domain for d in household.devices}
        for command in generate_commands(household, 70, random.Random(household.name)):
            intent = command.intent
            seen[intent.name] += 1
            assert parse_intent(intent.to_text()) == intent
            assert _TEXT.fullmatch(command.text), command.text
            assert len(command.text.split()) <= MAX_WORDS
            for value in intent.slots.values():
                assert value in command.text, (command.text, intent)
            name = intent.slots.get("name")
            if name is not None:
                assert name in domains
            if intent.name in ("HassTurnOn", "HassTurnOff") and name:
                assert domains[name] in SWITCHABLE
            if intent.name == "HassLightSet":
                assert int(intent.slots["brightness"]) in range(0, 101, 10)
                assert name is None or domains[name] == "light"
            if intent.name == "HassClimateSetTemperature":
                assert 16 <= int(intent.slots["temperature"]) <= 28
            if intent.slots.get("state") in ("locked", "unlocked"):
                assert domains[name] == "lock"
            if "area" in intent.slots:
                assert intent.slots["area"] in household.areas
    assert set(seen) == set(INTENT_SLOTS)
    assert max(seen.values()) - min(seen.values()) <= len(_sample_households())  # balanced


def test_commands_balanced_and_deterministic() -> None:
    household = load_households()[0]
    first = generate_commands(household, 70, random.Random(3))
    assert first == generate_commands(household, 70, random.Random(3))
    assert first != generate_commands(household, 70, random.Random(4))
    assert set(Counter(c.intent.name for c in first).values()) == {10}


def test_random_household_is_valid_and_deterministic(tmp_path: Path) -> None:
    households = [random_household(random.Random(seed)) for seed in range(20)]
    assert households[0] == random_household(random.Random(0))
    assert len({h.name for h in households}) == len(households)
    # random households pass the same validation as the packaged file
    assert load_households(_write(tmp_path / "random.json", [asdict(h) for h in households])) == households


def test_ctc_targets_spell_out_numbers_in_spoken_order() -> None:
    # The tiny Whisper's CTC head follows the sound, so "18" must be "eighteen", not "1", "8".
    text = "Set a timer for 40 minutes and 13 seconds"
    assert spoken(text) == "set a timer for forty minutes and thirteen seconds"
    assert [number_words(n) for n in (0, 7, 18, 28, 80, 100, 105)] == [
        "zero", "seven", "eighteen", "twenty eight", "eighty", "one hundred", "one hundred five",
    ]  # fmt: skip
    commands = [c for h in _sample_households() for c in generate_commands(h, 60, random.Random(5))]
    assert any(re.search(r"\d", c.text) for c in commands)
    assert not [c.text for c in commands if re.search(r"\d", spoken(c.text))]
