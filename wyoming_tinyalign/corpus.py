"""Spoken home-automation commands with the Home Assistant intents they mean.

Texts are lowercase, without punctuation (apostrophes inside names such as "grandma's lamp" are kept),
with digits for numbers (espeak-ng reads them aloud), at most 12 words, and every slot value appears
verbatim in the text so that a model can copy it. Generation is deterministic for a given rng state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .households import DOMAINS, MAX_NAME_WORDS, Device, Household
from .intents import Intent

MAX_WORDS = 12
SWITCHABLE = ("light", "switch", "fan", "media_player")  # domains that turn on and off


@dataclass(frozen=True)
class Command:
    text: str
    intent: Intent


@dataclass
class _Home:
    """What a household offers to each intent."""

    switchable: list[str]
    lights: list[str]
    light_areas: list[str]
    devices: list[Device]
    areas: list[str]

    @staticmethod
    def of(household: Household) -> _Home:
        lit = {d.area for d in household.devices if d.domain == "light"}
        return _Home(
            switchable=[d.name for d in household.devices if d.domain in SWITCHABLE],
            lights=[d.name for d in household.devices if d.domain == "light"],
            light_areas=[a for a in household.areas if a in lit],
            devices=list(household.devices),
            areas=list(household.areas),
        )


def generate_commands(household: Household, n: int, rng: random.Random) -> list[Command]:
    """``n`` commands for ``household``, balanced over the intents its devices allow."""
    home = _Home.of(household)
    names = [name for name, (applies, _) in _MAKERS.items() if applies(home)]
    commands: list[Command] = []
    while len(commands) < n:
        block = names[:]
        rng.shuffle(block)
        commands.extend(_MAKERS[name][1](home, rng) for name in block[: n - len(commands)])
    return commands


def random_household(rng: random.Random) -> Household:
    """A household with random device and area names (no speakers), for training on unseen names."""
    areas = rng.sample(AREA_NAMES, rng.randint(4, 6))
    count = rng.randint(8, 14)
    domains = ["light", "light", "lock", "climate"] + [rng.choice(DOMAINS) for _ in range(count - 4)]
    devices: list[Device] = []
    taken: set[str] = set()
    for domain in domains:
        while True:
            area = rng.choice(areas)
            obj = rng.choice(DEVICE_WORDS[domain])
            pattern = rng.randrange(4)
            if pattern == 0:
                name = obj
            elif pattern == 1:
                name = f"{rng.choice(ADJECTIVES)} {obj}"
            elif pattern == 2:
                name = f"{rng.choice(OWNERS)}'s {obj}"
            elif domain != "light":  # "kitchen light" would read like the kitchen's lights
                name = f"{area} {obj}"
            else:
                continue
            if name not in taken and len(name.split()) <= MAX_NAME_WORDS:
                break
        taken.add(name)
        devices.append(Device(name, domain, area))
    return Household(f"random-{rng.randrange(10**6):06d}", "synthetic", [], devices, areas)


def _the(name: str) -> str:
    """``the porch light`` but ``grandma's lamp``."""
    return name if "'s " in name else f"the {name}"


def _turn(home: _Home, rng: random.Random, state: str) -> Command:
    intent = "HassTurnOn" if state == "on" else "HassTurnOff"
    if home.light_areas and (not home.switchable or rng.random() < 0.35):
        area = rng.choice(home.light_areas)
        text = rng.choice(_TURN_AREA[state]).format(area=area)
        return Command(text, Intent(intent, {"area": area, "domain": "light"}))
    name = rng.choice(home.switchable)
    return Command(rng.choice(_TURN_NAME[state]).format(n=_the(name)), Intent(intent, {"name": name}))


def _light_set(home: _Home, rng: random.Random) -> Command:
    brightness = rng.randrange(0, 101, 10)
    words = {"b": brightness, "verb": "dim" if brightness <= 50 else "brighten"}
    if home.light_areas and rng.random() < 0.4:
        area = rng.choice(home.light_areas)
        text = rng.choice(_LIGHT_AREA).format(area=area, **words)
        return Command(text, Intent("HassLightSet", {"area": area, "brightness": str(brightness)}))
    name = rng.choice(home.lights)
    text = rng.choice(_LIGHT_NAME).format(n=_the(name), **words)
    return Command(text, Intent("HassLightSet", {"name": name, "brightness": str(brightness)}))


def _climate(home: _Home, rng: random.Random) -> Command:
    temperature = str(rng.randint(16, 28))
    if home.areas and rng.random() < 0.5:
        area = rng.choice(home.areas)
        text = rng.choice(_CLIMATE_AREA).format(area=area, t=temperature)
        return Command(text, Intent("HassClimateSetTemperature", {"area": area, "temperature": temperature}))
    text = rng.choice(_CLIMATE).format(t=temperature)
    return Command(text, Intent("HassClimateSetTemperature", {"temperature": temperature}))


def _get_state(home: _Home, rng: random.Random) -> Command:
    if home.areas and home.switchable and rng.random() < 0.2:
        area = rng.choice(home.areas)
        text = rng.choice(_STATE_AREA).format(area=area)
        return Command(text, Intent("HassGetState", {"area": area, "state": "on"}))
    device = rng.choice(home.devices)
    states = _STATES.get(device.domain, ("on", "off") if device.domain in SWITCHABLE else ())
    if states and rng.random() < 0.6:
        state = rng.choice(states)
        text = rng.choice(_STATE_IS).format(n=_the(device.name), state=state)
        return Command(text, Intent("HassGetState", {"name": device.name, "state": state}))
    text = rng.choice(_STATE_NAME).format(n=_the(device.name))
    return Command(text, Intent("HassGetState", {"name": device.name}))


def _start_timer(home: _Home, rng: random.Random) -> Command:
    hours, minutes, seconds = rng.randint(1, 4), rng.randint(1, 59), rng.randint(5, 59)
    kind = rng.randrange(5)
    if kind < 3:
        slot, value = (("minutes", minutes), ("seconds", seconds), ("hours", hours))[kind]
        text = rng.choice(_TIMER).format(v=value, unit=_unit(slot, value), unit1=slot[:-1])
        return Command(text, Intent("HassStartTimer", {slot: str(value)}))
    if kind == 3:
        first, second = ("hours", hours), ("minutes", minutes)
    else:
        first, second = ("minutes", minutes), ("seconds", seconds)
    text = rng.choice(_TIMER2).format(a=first[1], a_unit=_unit(*first), b=second[1], b_unit=_unit(*second))
    return Command(text, Intent("HassStartTimer", {first[0]: str(first[1]), second[0]: str(second[1])}))


def _cancel_timers(home: _Home, rng: random.Random) -> Command:
    return Command(rng.choice(_CANCEL), Intent("HassCancelAllTimers"))


def _unit(slot: str, value: int) -> str:
    return slot[:-1] if value == 1 else slot


_Maker = Callable[[_Home, random.Random], Command]
_MAKERS: dict[str, tuple[Callable[[_Home], object], _Maker]] = {
    "HassTurnOn": (lambda h: h.switchable or h.light_areas, lambda h, rng: _turn(h, rng, "on")),
    "HassTurnOff": (lambda h: h.switchable or h.light_areas, lambda h, rng: _turn(h, rng, "off")),
    "HassLightSet": (lambda h: h.lights, _light_set),
    "HassClimateSetTemperature": (lambda h: True, _climate),
    "HassGetState": (lambda h: h.devices, _get_state),
    "HassStartTimer": (lambda h: True, _start_timer),
    "HassCancelAllTimers": (lambda h: True, _cancel_timers),
}

_TURN_NAME = {
    "on": ("turn on {n}", "switch on {n}", "turn {n} on", "please turn on {n}", "can you turn on {n}"),
    "off": ("turn off {n}", "switch off {n}", "turn {n} off", "please turn off {n}", "shut off {n}"),
}
_TURN_AREA = {
    "on": (
        "turn on the lights in the {area}",
        "turn on the {area} lights",
        "switch on the {area} lights",
        "lights on in the {area}",
    ),
    "off": (
        "turn off the lights in the {area}",
        "turn off the {area} lights",
        "switch off the lights in the {area}",
        "lights off in the {area}",
    ),
}
_LIGHT_NAME = (
    "set {n} to {b} percent",
    "set {n} brightness to {b} percent",
    "change {n} to {b} percent",
    "{verb} {n} to {b} percent",
)
_LIGHT_AREA = (
    "set the {area} lights to {b} percent",
    "set the lights in the {area} to {b} percent",
    "{verb} the {area} lights to {b} percent",
    "{verb} the lights in the {area} to {b} percent",
)
_CLIMATE = (
    "set the temperature to {t} degrees",
    "set the thermostat to {t} degrees",
    "make it {t} degrees",
    "change the temperature to {t}",
)
_CLIMATE_AREA = (
    "set the temperature in the {area} to {t} degrees",
    "make the {area} {t} degrees",
    "set the {area} to {t} degrees",
    "heat the {area} to {t} degrees",
)
_STATES = {"lock": ("locked", "unlocked"), "cover": ("open", "closed")}
_STATE_IS = ("is {n} {state}", "tell me if {n} is {state}", "check if {n} is {state}")
_STATE_NAME = ("what is the state of {n}", "what is the status of {n}", "check {n}")
_STATE_AREA = ("is anything on in the {area}", "are any devices on in the {area}")
_TIMER = (
    "set a timer for {v} {unit}",
    "start a timer for {v} {unit}",
    "timer for {v} {unit}",
    "set a {v} {unit1} timer",
    "start a {v} {unit1} timer",
)
_TIMER2 = ("set a timer for {a} {a_unit} and {b} {b_unit}", "start a timer for {a} {a_unit} and {b} {b_unit}")
_CANCEL = (
    "cancel all timers",
    "cancel all my timers",
    "cancel all the timers",
    "stop all timers",
    "clear all timers",
    "cancel every timer",
)

AREA_NAMES = (
    "kitchen", "living room", "dining room", "bedroom", "guest room", "bathroom", "hallway", "office",
    "study", "garage", "basement", "attic", "laundry room", "pantry", "porch", "patio", "garden",
    "backyard", "nursery", "playroom", "library", "gym", "sun room", "mud room", "workshop", "cellar",
    "loft", "den", "lounge", "game room", "studio", "greenhouse", "shed", "balcony", "veranda", "foyer",
    "boat house", "music room", "wine cellar", "kids room", "master bedroom", "utility room",
)  # fmt: skip
DEVICE_WORDS: dict[str, tuple[str, ...]] = {
    "light": (
        "lamp", "lantern", "sconce", "chandelier", "spotlight", "light strip", "pendant",
        "uplight", "neon sign", "bulb", "led strip", "string lights", "night light", "floor lamp",
    ),
    "switch": (
        "pump", "kettle", "fountain", "humidifier", "dehumidifier", "printer", "charger", "air purifier",
        "coffee machine", "toaster", "sprinkler", "fish tank", "bubble machine", "heated blanket",
        "rice cooker", "fog machine", "water heater", "plug", "outlet", "massage chair",
    ),
    "fan": ("fan", "tower fan", "box fan", "exhaust fan", "ceiling fan", "desk fan"),
    "cover": (
        "blinds", "shutters", "curtains", "garage door", "awning", "skylight", "shades", "roller blind",
    ),
    "lock": ("door", "gate", "deadbolt", "side door", "shed door", "cat flap", "back door", "front door"),
    "climate": ("thermostat", "heat pump", "air conditioner", "radiator", "boiler", "floor heating"),
    "media_player": (
        "tv", "speaker", "radio", "sound bar", "record player", "jukebox", "projector", "stereo",
        "smart display",
    ),
}  # fmt: skip
ADJECTIVES = (
    "red", "blue", "green", "yellow", "purple", "big", "small", "little", "old", "new", "corner", "tall",
    "round", "vintage", "brass", "wooden", "glass", "upstairs", "downstairs", "left", "right", "north",
    "south", "main", "second", "hanging", "outdoor", "smart", "silver", "golden", "white", "black", "cozy",
)  # fmt: skip
OWNERS = (
    "grandma", "grandpa", "mom", "dad", "emma", "liam", "olivia", "noah", "mia", "lucas", "zoe", "oscar",
    "ava", "leo", "nina", "felix", "ruby", "max", "luna", "theo", "auntie", "uncle",
)  # fmt: skip
