"""Household context from Home Assistant, against a local websocket server that speaks Home Assistant's
protocol (auth handshake, `get_states`, the registries, the Assist exposure list); auth failure,
disconnects, an unreachable or hanging Home Assistant; and the real server fed by it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from serving import TIMEOUT, ServerProcess, describe_rtt, free_port, serve_args

from wyoming_tinyalign.assistant import load_context_file
from wyoming_tinyalign.hass import (
    HOUSEHOLD_FILE,
    MAX_AREAS,
    MAX_CONTEXT_CHARS,
    MAX_NAMES,
    HassAuthError,
    HassContext,
    HassEntity,
    HassError,
    HassSnapshot,
    cached_context,
    context_text,
    fetch_snapshot,
    plain_name,
    websocket_url,
)
from wyoming_tinyalign.households import DOMAINS, load_households
from wyoming_tinyalign.model.prompt import context_names

TOKEN = "test-token"
NO_WEB = {"WYOMING_TINYALIGN_WEB_PORT": "off"}  # no web API on its fixed port (ignored without the flag)
CONTEXT_FORMAT = re.compile(r"areas: [^;]*; devices: [^;]*")

AREAS = [
    {"area_id": "kitchen", "name": "Kitchen", "aliases": [], "floor_id": None, "icon": None},
    {"area_id": "living_room", "name": "Living Room", "aliases": [], "floor_id": None, "icon": None},
    {"area_id": "front_yard", "name": "Front Yard", "aliases": [], "floor_id": None, "icon": None},
    {"area_id": "attic", "name": "Attic", "aliases": [], "floor_id": None, "icon": None},
]
DEVICES = [
    {"id": "d-hue", "name": "Hue Go", "name_by_user": None, "area_id": "living_room"},
    {"id": "d-kettle", "name": "Plug 3", "name_by_user": "Kettle plug", "area_id": "kitchen"},
]


def _state(entity_id: str, friendly: str | None) -> dict[str, Any]:
    attributes = {"friendly_name": friendly} if friendly else {}
    return {"entity_id": entity_id, "state": "on", "attributes": attributes, "context": {"id": "x"}}


def _entry(entity_id: str, **kw: Any) -> dict[str, Any]:
    entry = {"entity_id": entity_id, "name": None, "original_name": None, "area_id": None, "device_id": None}
    entry |= {"disabled_by": None, "hidden_by": None, "entity_category": None, "platform": "demo"}
    return entry | kw


STATES = [
    _state("light.porch", "Porch Light"),
    _state("light.hue_go", "Hue Go"),  # area through its device
    _state("switch.kettle", "Kettle"),
    _state("sensor.outside_temperature", "Outside Temperature"),
    _state("light.attic", "Attic Bulb"),  # not exposed
    _state("climate.heat_pump", "Wärmepumpe"),  # not ASCII: kept for the prompt, folded for the file
    _state("fan.ceiling", "Ceiling Fan, Bedroom"),  # no area; a comma the prompt must not carry
    _state("cover.garage_door", None),  # no friendly name: the registry's
    _state("lock.front_door", "The Big Old Front Door"),  # 5 words: prompt only
]
ENTITIES = [
    _entry("light.porch", area_id="front_yard"),
    _entry("light.hue_go", device_id="d-hue"),
    _entry("switch.kettle", device_id="d-kettle"),
    _entry("sensor.outside_temperature"),
    _entry("light.attic", area_id="attic"),
    _entry("climate.heat_pump", area_id="living_room"),
    _entry("fan.ceiling"),
    _entry("cover.garage_door", original_name="Garage Door", area_id="front_yard"),
    _entry("lock.front_door", area_id="front_yard"),
]
EXPOSED = {
    "exposed_entities": {
        **{e["entity_id"]: {"conversation": True, "cloud.alexa": False} for e in ENTITIES},
        "light.attic": {"conversation": False, "cloud.alexa": True},
    }
}


@dataclass
class FakeHass:
    """Home Assistant's websocket API, as far as the context client uses it."""

    token: str = TOKEN
    states: list[dict[str, Any]] = field(default_factory=lambda: list(STATES))
    registry: list[dict[str, Any]] = field(default_factory=lambda: list(ENTITIES))
    exposed: dict[str, Any] | None = field(default_factory=lambda: dict(EXPOSED))  # None: not admin
    mode: str = "ok"  # ok | close-after-auth | drop-mid-command | hang | garbage
    connections: int = 0
    auths: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        self.connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if self.mode == "hang":
            await asyncio.sleep(TIMEOUT)
            return ws
        if self.mode == "garbage":
            await ws.send_str("this is not json")
            await ws.close()
            return ws
        await ws.send_json({"type": "auth_required", "ha_version": "2025.1.0"})
        auth = await ws.receive_json(timeout=TIMEOUT)
        self.auths.append(auth)
        if auth.get("type") != "auth" or auth.get("access_token") != self.token:
            await ws.send_json({"type": "auth_invalid", "message": "Invalid access token or password"})
            await ws.close()
            return ws
        await ws.send_json({"type": "auth_ok", "ha_version": "2025.1.0"})
        if self.mode == "close-after-auth":
            await ws.close()
            return ws
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                break
            command = json.loads(message.data)
            self.commands.append(command)
            if self.mode == "drop-mid-command" and command["type"] == "config/device_registry/list":
                assert request.transport is not None
                request.transport.abort()  # no close frame: the network went away
                return ws
            await ws.send_json(self.answer(command))
        return ws

    def answer(self, command: dict[str, Any]) -> dict[str, Any]:
        results = {
            "get_states": self.states,
            "config/area_registry/list": AREAS,
            "config/device_registry/list": DEVICES,
            "config/entity_registry/list": self.registry,
            "homeassistant/expose_entity/list": self.exposed,
        }
        result = results.get(command["type"])
        if result is None:
            error = {"code": "unauthorized", "message": "Unauthorized"}
            if command["type"] not in results:
                error = {"code": "unknown_command", "message": "Unknown command."}
            return {"id": command["id"], "type": "result", "success": False, "error": error}
        return {"id": command["id"], "type": "result", "success": True, "result": result}


@pytest.fixture
async def hass() -> AsyncIterator[FakeHass]:
    fake = FakeHass()
    app = web.Application()
    app.router.add_get("/api/websocket", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await asyncio.wait_for(runner.cleanup(), TIMEOUT)


async def until(predicate, timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------------------- client
def test_websocket_url_from_what_users_type() -> None:
    assert websocket_url("http://homeassistant.local:8123") == "ws://homeassistant.local:8123/api/websocket"
    assert websocket_url("https://ha.example.org/") == "wss://ha.example.org/api/websocket"
    assert websocket_url("ws://supervisor/core/websocket") == "ws://supervisor/core/websocket"
    assert websocket_url("ws://10.0.0.2:8123") == "ws://10.0.0.2:8123/api/websocket"
    for bad in ("homeassistant.local:8123", "ftp://x", "http://"):
        with pytest.raises(ValueError, match="--hass-url"):
            websocket_url(bad)


async def test_fetch_reads_exposed_entities_with_their_areas(hass: FakeHass) -> None:
    snapshot = await fetch_snapshot(hass.url, TOKEN, timeout=TIMEOUT)
    assert hass.auths == [{"type": "auth", "access_token": TOKEN}]
    types = [c["type"] for c in hass.commands]
    assert types == [
        "get_states",
        "config/area_registry/list",
        "config/device_registry/list",
        "config/entity_registry/list",
        "homeassistant/expose_entity/list",
    ]
    assert [c["id"] for c in hass.commands] == [1, 2, 3, 4, 5]
    assert snapshot.exposure_known
    by_id = {e.entity_id: e for e in snapshot.entities}
    assert "light.attic" not in by_id  # not exposed to Assist
    assert by_id["light.porch"] == HassEntity("light.porch", "Porch Light", "Front Yard")
    assert by_id["light.hue_go"].area == "Living Room"  # the device's area
    assert by_id["switch.kettle"].area == "Kitchen"
    assert by_id["cover.garage_door"].name == "Garage Door"  # the registry's name
    assert by_id["fan.ceiling"].area is None
    assert snapshot.areas == ["Attic", "Front Yard", "Kitchen", "Living Room"]


async def test_without_the_exposure_list_the_default_domains_are_used(hass: FakeHass) -> None:
    hass.exposed = None  # a non-admin token: the command is refused
    hass.registry = [*ENTITIES[:-1], _entry("lock.front_door", hidden_by="user")]
    snapshot = await fetch_snapshot(hass.url, TOKEN, timeout=TIMEOUT)
    assert not snapshot.exposure_known
    ids = {e.entity_id for e in snapshot.entities}
    assert "light.attic" in ids  # exposed by default, as Home Assistant does
    assert "sensor.outside_temperature" not in ids and "lock.front_door" not in ids  # domain; hidden


async def test_a_refused_token_is_an_auth_error(hass: FakeHass) -> None:
    with pytest.raises(HassAuthError, match="Invalid access token"):
        await fetch_snapshot(hass.url, "wrong", timeout=TIMEOUT)
    assert hass.commands == []


@pytest.mark.parametrize("mode", ["close-after-auth", "drop-mid-command", "garbage"])
async def test_disconnects_and_garbage_are_hass_errors(hass: FakeHass, mode: str) -> None:
    hass.mode = mode
    with pytest.raises(HassError):
        await fetch_snapshot(hass.url, TOKEN, timeout=TIMEOUT)


async def test_unreachable_and_hanging_home_assistant_fail_in_bounded_time(hass: FakeHass) -> None:
    with pytest.raises(HassError, match="cannot reach"):
        await fetch_snapshot(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=TIMEOUT)
    hass.mode = "hang"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(HassError, match="within"):
        await fetch_snapshot(hass.url, TOKEN, timeout=0.5)
    assert loop.time() - t0 < 5


# ---------------------------------------------------------------------------------------- context
async def test_context_text_is_the_prompt_format(hass: FakeHass) -> None:
    text = context_text(await fetch_snapshot(hass.url, TOKEN, timeout=TIMEOUT))
    assert CONTEXT_FORMAT.fullmatch(text), text
    assert text == (
        "areas: front yard, kitchen, living room; devices: ceiling fan bedroom, garage door, hue go, "
        "kettle, outside temperature, porch light, the big old front door, wärmepumpe"
    )  # areas that have exposed entities; friendly names lowercased; no `,` inside a name
    names = context_names(text)  # as the intent's slot values read it back
    assert names["areas"] == ["front yard", "kitchen", "living room"]
    assert names["devices"][-2:] == ["the big old front door", "wärmepumpe"] and len(names["devices"]) == 8


def test_context_text_is_capped_deterministic_and_prefers_controllable_devices() -> None:
    areas = [f"Room {i:02d}" for i in range(20)]
    entities = [HassEntity(f"sensor.s{i:03d}", f"Sensor {i:03d}", areas[i % 20]) for i in range(100)] + [
        HassEntity(f"light.l{i:02d}", f"Lamp {i:02d}", areas[i % 20]) for i in range(30)
    ]
    snapshot = HassSnapshot(areas, entities, True)
    text = context_text(snapshot)
    assert text == context_text(HassSnapshot(list(reversed(areas)), list(reversed(entities)), True))
    assert CONTEXT_FORMAT.fullmatch(text) and len(text) <= MAX_CONTEXT_CHARS
    area_part, device_part = text.removeprefix("areas: ").split("; devices: ")
    kept_areas, kept_devices = area_part.split(", "), device_part.split(", ")
    assert len(kept_areas) <= MAX_AREAS and len(kept_areas) + len(kept_devices) <= MAX_NAMES
    assert all(f"lamp {i:02d}" in kept_devices for i in range(30))  # lights before sensors
    long = [HassEntity(f"light.x{i}", "a very long name " * 4 + str(i), None) for i in range(40)]
    assert len(context_text(HassSnapshot([], long, True))) <= MAX_CONTEXT_CHARS


def test_names_for_the_households_file() -> None:
    assert plain_name("Kid's Room") == "kid's room"
    assert plain_name("Wärmepumpe") == "warmepumpe"
    assert plain_name("TV (Sony)") == "tv sony"
    assert plain_name("The Big Old Front Door") is None  # more than 3 words
    assert plain_name("💡") is None


async def test_household_json_is_a_households_file_and_is_rewritten_only_on_change(
    hass: FakeHass, tmp_path: Path
) -> None:
    context = HassContext(hass.url, TOKEN, data_dir=tmp_path)
    await context.refresh()
    path = tmp_path / HOUSEHOLD_FILE
    (home,) = load_households(path)  # the same loader the synthetic speech uses
    assert home.speakers == [] and home.areas == ["attic", "front yard", "kitchen", "living room"]
    devices = {d.name: (d.domain, d.area) for d in home.devices}
    assert devices == {
        "porch light": ("light", "front yard"),
        "hue go": ("light", "living room"),
        "kettle": ("switch", "kitchen"),
        "warmepumpe": ("climate", "living room"),
        "garage door": ("cover", "front yard"),
    }  # synthesisable domains with an area; the sensor, the 5-word lock and the area-less fan are not
    assert all(d.domain in DOMAINS for d in home.devices)
    extra = json.loads(path.read_text())["home_assistant"]
    assert extra["unplaced_devices"] == [{"name": "ceiling fan bedroom", "domain": "fan"}]
    assert extra["exposed_entities"] == 8 and extra["exposure_known"] is True
    assert load_context_file(path) == context() == cached_context(path)  # as --context-file reads it
    before = path.stat().st_mtime_ns, path.stat().st_ino
    await context.refresh()
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before  # unchanged: not rewritten
    hass.states = [s for s in STATES if s["entity_id"] != "switch.kettle"]
    await context.refresh()
    assert "kettle" not in context() and "kettle" not in {d.name for d in load_households(path)[0].devices}
    assert cached_context(tmp_path / "missing.json") == ""
    (tmp_path / "bad.json").write_text("{")
    assert cached_context(tmp_path / "bad.json") == ""


# ------------------------------------------------------------------------------ background refresh
async def test_the_provider_answers_at_once_while_home_assistant_hangs(hass: FakeHass) -> None:
    hass.mode = "hang"
    context = HassContext(hass.url, TOKEN, initial="areas: a; devices: b", fetch_timeout=0.3)
    await context.start()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert context() == "areas: a; devices: b"
        assert loop.time() - t0 < 0.01
        await until(lambda: context.failures >= 1)
        assert "within" in (context.last_error or "") and context() == "areas: a; devices: b"
    finally:
        await asyncio.wait_for(context.stop(), TIMEOUT)


async def test_refresh_backs_off_keeps_the_last_context_and_recovers(hass: FakeHass) -> None:
    context = HassContext(
        hass.url, TOKEN, refresh_s=0.2, fetch_timeout=TIMEOUT, backoff_first_s=0.05, backoff_max_s=0.2
    )
    await context.start()
    try:
        await asyncio.wait_for(context.updated.wait(), TIMEOUT)
        good = context()
        assert "porch light" in good
        hass.mode = "drop-mid-command"  # Home Assistant restarts: connections break
        await until(lambda: context.failures >= 3)
        assert context() == good  # the last good context is kept
        hass.mode = "ok"
        hass.states = [*STATES, _state("switch.coffee", "Coffee Maker")]
        hass.registry = [*ENTITIES, _entry("switch.coffee", area_id="kitchen")]
        hass.exposed = {
            "exposed_entities": {**EXPOSED["exposed_entities"], "switch.coffee": {"conversation": True}}
        }
        await until(lambda: "coffee maker" in context())
        assert context.failures == 0 and context.last_error is None
    finally:
        await asyncio.wait_for(context.stop(), TIMEOUT)


async def test_a_refused_token_is_retried_and_logged_once(
    hass: FakeHass, caplog: pytest.LogCaptureFixture
) -> None:
    context = HassContext(hass.url, "wrong", initial="", backoff_first_s=0.02, backoff_max_s=0.05)
    await context.start()
    try:
        await until(lambda: context.failures >= 3)
    finally:
        await asyncio.wait_for(context.stop(), TIMEOUT)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "refused" in r.getMessage()]
    assert len(errors) == 1 and "wrong" not in errors[0].getMessage()  # the token is never logged
    assert context() == ""


def test_bad_settings_fail_at_once() -> None:
    with pytest.raises(ValueError, match="--hass-token"):
        HassContext("http://ha:8123", "")
    with pytest.raises(ValueError, match="--hass-url"):
        HassContext("ha:8123", TOKEN)
    with pytest.raises(ValueError, match="refresh"):
        HassContext("http://ha:8123", TOKEN, refresh_s=0)


async def test_the_server_serves_while_home_assistant_is_down_and_picks_it_up(
    hass: FakeHass, micro_model: Path, tmp_path: Path
) -> None:
    """`serve --hass-url` (token from the env) with Home Assistant restarting: the server is ready and
    answers at once; when Home Assistant is back, the context arrives and goes to household.json."""
    hass.mode = "close-after-auth"
    data = tmp_path / "data"
    server = ServerProcess(
        serve_args(micro_model, data, "--uri", "tcp://127.0.0.1:0", "--hass-url", hass.url),
        tmp_path / "server.log",
        env={"WYOMING_TINYALIGN_HASS_TOKEN": TOKEN, **NO_WEB},
    )
    try:
        await asyncio.to_thread(server.wait_ready)
        info, _ = await describe_rtt(*server.host_port)
        assert info.asr
        await until(lambda: "unavailable" in server.text)
        assert not (data / HOUSEHOLD_FILE).exists()
        hass.mode = "ok"  # back: picked up at the next retry (the first after 5 s)
        await until(lambda: (data / HOUSEHOLD_FILE).is_file() and "exposed entities" in server.text)
        assert "porch light" in cached_context(data / HOUSEHOLD_FILE)
        info, _ = await describe_rtt(*server.host_port)
        assert info.asr and hass.auths[-1] == {"type": "auth", "access_token": TOKEN}
        assert TOKEN not in server.text
    finally:
        assert await asyncio.to_thread(server.stop) == 0
