"""Household context from Home Assistant: exposed entities, areas and device names over the websocket API.

`HassContext` runs as a background task in the server. It fetches once at start-up (serving does not wait
for it), then every `--hass-refresh-minutes`, backing off exponentially while Home Assistant is
unreachable; the last good context is kept. Calling it (it is a `ContextProvider`) returns the latest text
at once, so a request never waits for Home Assistant.

The protocol (`ws://HOST:8123/api/websocket`, or `ws://supervisor/core/websocket` inside an add-on):
the server sends `auth_required`, the client `{"type": "auth", "access_token": ...}`, the server `auth_ok`
or `auth_invalid`; then commands with increasing ids, each answered by a `result` with the same id:
`get_states`, `config/area_registry/list`, `config/device_registry/list`, `config/entity_registry/list`
and `homeassistant/expose_entity/list` (what Assist may see; admin only, so best effort: without it the
domains Home Assistant exposes by default are used).

Each good fetch also goes to `DATA_DIR/household.json`, which both loaders of household files read:

    {"areas": [...], "devices": [...],
     "households": [{"name": "home", "split": "household", "speakers": [],
                     "areas": [...], "devices": [{"name": ..., "domain": ..., "area": ...}]}],
     "home_assistant": {"exposed_entities": N, "exposure_known": true,
                        "unplaced_devices": [{"name": ..., "domain": ...}]}}

- top-level `areas`/`devices`: the prompt's names, so `--context-file DATA_DIR/household.json`
  (`assistant.load_context_file`) gives exactly the context the server used; read back at start-up, so
  a restart with Home Assistant down keeps the last context;
- `households`: one household in the households-file format (`households.load_households`), for
  rendering bootstrap speech with the household's own names: names of 1-3 plain words (accents folded),
  devices of the synthesised domains that have an area; the others are `unplaced_devices`. No speakers:
  the voices come from elsewhere.

The file is rewritten (atomically) only when its content changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .assistant import load_context_file
from .files import write_atomic
from .households import DOMAINS, MAX_NAME_WORDS
from .model import prompt

_LOGGER = logging.getLogger(__name__)

SUPERVISOR_URL = "ws://supervisor/core/websocket"
HOUSEHOLD_FILE = "household.json"
DEFAULT_REFRESH_MINUTES = 30.0
FETCH_TIMEOUT_S = 60.0
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 600.0
MAX_NAMES = 40  # areas + devices in the prompt: it must stay short
MAX_AREAS = 10
MAX_CONTEXT_CHARS = 800
MAX_MESSAGE_BYTES = 64 << 20  # get_states of a big installation is several MB
PARSE_IN_THREAD_BYTES = 256 << 10

# What Home Assistant exposes to Assist by default (used when the exposure list cannot be read).
DEFAULT_EXPOSED_DOMAINS = frozenset(
    ("climate", "cover", "fan", "humidifier", "light", "lock", "media_player", "scene", "switch", "todo")
    + ("vacuum", "water_heater")
)
COMMANDS = (
    "get_states",
    "config/area_registry/list",
    "config/device_registry/list",
    "config/entity_registry/list",
)
EXPOSE_COMMAND = "homeassistant/expose_entity/list"

_PROMPT_UNSAFE = re.compile(r"[,;:\s]+")  # the prompt's separators
_WORD = re.compile(r"[a-z0-9']+")


class HassError(Exception):
    """Home Assistant could not be asked (unreachable, closed, bad answer)."""


class HassAuthError(HassError):
    """Home Assistant refused the access token."""


class HassCommandError(HassError):
    """A command was answered with `success: false`."""


@dataclass(frozen=True)
class HassEntity:
    entity_id: str
    name: str  # as Home Assistant shows it (friendly name)
    area: str | None  # area name

    @property
    def domain(self) -> str:
        return self.entity_id.split(".", 1)[0]


@dataclass(frozen=True)
class HassSnapshot:
    """What Assist sees in the household: areas (names) and the exposed entities."""

    areas: list[str]
    entities: list[HassEntity]
    exposure_known: bool  # False: the exposure list was not readable; default domains were used


# --------------------------------------------------------------------------------------- the client
def websocket_url(url: str) -> str:
    """`http(s)://host:8123[/]` -> `ws(s)://host:8123/api/websocket`; a ws(s) URL with a path as it is."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(
            f"--hass-url {url!r}: expected http(s)://HOST:8123 or ws(s)://HOST:8123/api/websocket"
        )
    path = parts.path.rstrip("/")
    if parts.scheme.lower() in ("http", "https") or not path:
        path = f"{path}/api/websocket"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


async def fetch_snapshot(url: str, token: str, timeout: float = FETCH_TIMEOUT_S) -> HassSnapshot:
    """Connect, authenticate, read the states and registries; raises `HassError` (or a subclass)."""
    try:
        async with (
            asyncio.timeout(timeout),
            aiohttp.ClientSession() as session,
            session.ws_connect(websocket_url(url), max_msg_size=MAX_MESSAGE_BYTES) as ws,
        ):
            return await _Connection(ws).fetch(token)
    except TimeoutError as err:
        raise HassError(f"no complete answer within {timeout:.0f} s") from err
    except (aiohttp.ClientError, OSError) as err:
        raise HassError(f"cannot reach Home Assistant: {err}") from err


class _Connection:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 1

    async def fetch(self, token: str) -> HassSnapshot:
        await self.authenticate(token)
        states, areas, devices, registry = [await self.command(name) for name in COMMANDS]
        try:
            exposed = await self.command(EXPOSE_COMMAND)
        except HassCommandError as err:  # not an admin token, or an older Home Assistant
            _LOGGER.warning(
                "cannot read which entities are exposed to Assist (%s); using default domains", err
            )
            exposed = None
        return await asyncio.to_thread(build_snapshot, states, areas, devices, registry, exposed)

    async def authenticate(self, token: str) -> None:
        hello = await self.receive()
        if hello.get("type") != "auth_required":
            raise HassError(f"expected auth_required, got {hello.get('type')!r}")
        await self.ws.send_json({"type": "auth", "access_token": token})
        answer = await self.receive()
        if answer.get("type") == "auth_invalid":
            raise HassAuthError(f"access token refused: {answer.get('message') or 'auth_invalid'}")
        if answer.get("type") != "auth_ok":
            raise HassError(f"expected auth_ok, got {answer.get('type')!r}")

    async def command(self, kind: str) -> Any:
        msg_id, self.next_id = self.next_id, self.next_id + 1
        await self.ws.send_json({"id": msg_id, "type": kind})
        while True:  # bounded by the caller's timeout; other messages (none expected) are skipped
            message = await self.receive()
            if message.get("id") != msg_id or message.get("type") != "result":
                continue
            if not message.get("success"):
                error = message.get("error") or {}
                raise HassCommandError(
                    f"{kind}: {error.get('code', '?')}: {error.get('message', '')}".strip()
                )
            return message.get("result")

    async def receive(self) -> dict[str, Any]:
        message = await self.ws.receive()
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            raise HassError("Home Assistant closed the connection")
        if message.type == aiohttp.WSMsgType.ERROR:
            raise HassError(f"websocket error: {self.ws.exception()}")
        if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            raise HassError(f"unexpected websocket message {message.type!r}")
        data = message.data
        try:  # a big get_states is parsed off the event loop: requests must not wait for it
            value = (
                json.loads(data)
                if len(data) < PARSE_IN_THREAD_BYTES
                else await asyncio.to_thread(json.loads, data)
            )
        except ValueError as err:
            raise HassError(f"not JSON: {err}") from err
        if not isinstance(value, dict):
            raise HassError("expected a JSON object")
        return value


def build_snapshot(states: Any, areas: Any, devices: Any, registry: Any, exposed: Any | None) -> HassSnapshot:
    """The exposed entities with their friendly names and area names, from the raw command results."""
    area_names = {a["area_id"]: a["name"] for a in _records(areas) if _texts(a, "area_id", "name")}
    device_area = {d["id"]: d.get("area_id") for d in _records(devices) if _texts(d, "id")}
    entries = {e["entity_id"]: e for e in _records(registry) if _texts(e, "entity_id")}
    exposed_ids: set[str] | None = None
    if isinstance(exposed, dict) and isinstance(exposed.get("exposed_entities"), dict):
        exposed_ids = {
            entity_id
            for entity_id, assistants in exposed["exposed_entities"].items()
            if isinstance(assistants, dict) and assistants.get("conversation") is True
        }
    entities = []
    for state in _records(states):
        entity_id = state.get("entity_id")
        if not isinstance(entity_id, str) or "." not in entity_id:
            continue
        entry = entries.get(entity_id, {})
        if exposed_ids is not None:
            if entity_id not in exposed_ids:
                continue
        elif (
            entity_id.split(".", 1)[0] not in DEFAULT_EXPOSED_DOMAINS
            or entry.get("hidden_by")
            or entry.get("entity_category")
        ):
            continue
        if entry.get("disabled_by"):
            continue
        attributes = state.get("attributes") if isinstance(state.get("attributes"), dict) else {}
        name = next(
            (n for n in (attributes.get("friendly_name"), entry.get("name"), entry.get("original_name"))
             if isinstance(n, str) and n.strip()),
            entity_id.split(".", 1)[1].replace("_", " "),
        )  # fmt: skip
        area_id = entry.get("area_id") or device_area.get(entry.get("device_id"))
        entities.append(HassEntity(entity_id, name.strip(), area_names.get(area_id)))
    entities.sort(key=lambda e: e.entity_id)
    return HassSnapshot(sorted(area_names.values()), entities, exposed_ids is not None)


def _records(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _texts(record: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(record.get(k), str) and record[k] for k in keys)


# ------------------------------------------------------------------------------- what it becomes
def prompt_name(name: str) -> str:
    """A name as the prompt carries it: lowercase, one space between words, none of `,;:`."""
    return " ".join(_PROMPT_UNSAFE.split(name.lower())).strip()


def plain_name(name: str) -> str | None:
    """A name in the households format (1-3 words of a-z, 0-9, '), or None when it cannot be one."""
    folded = unicodedata.normalize("NFKD", name.lower()).encode("ascii", "ignore").decode()
    words = _WORD.findall(folded.replace("’", "'"))
    words = [w for w in (w.strip("'") for w in words) if w]
    return " ".join(words) if 0 < len(words) <= MAX_NAME_WORDS else None


def prompt_names(snapshot: HassSnapshot) -> tuple[list[str], list[str]]:
    """The area and device names for the prompt, sorted and capped: at most `MAX_NAMES` names (areas
    with exposed entities first, at most `MAX_AREAS`; then devices, controllable domains before the
    others) and `MAX_CONTEXT_CHARS` characters of text. Deterministic: the same household, the same names."""
    counts: dict[str, int] = {}
    for entity in snapshot.entities:
        if entity.area and prompt_name(entity.area):
            counts[prompt_name(entity.area)] = counts.get(prompt_name(entity.area), 0) + 1
    areas = counts or {n: 0 for n in (prompt_name(a) for a in snapshot.areas) if n}
    kept_areas = sorted(sorted(areas), key=lambda a: -areas[a])[:MAX_AREAS]
    ranked: dict[str, int] = {}
    for entity in snapshot.entities:
        name = prompt_name(entity.name)
        if name:
            rank = 0 if entity.domain in DOMAINS else 1
            ranked[name] = min(rank, ranked.get(name, rank))
    devices = sorted(ranked, key=lambda n: (ranked[n], n))[: max(0, MAX_NAMES - len(kept_areas))]
    while len(prompt.context_text(kept_areas, devices)) > MAX_CONTEXT_CHARS and (devices or kept_areas):
        (devices if devices else kept_areas).pop()
    return sorted(kept_areas), sorted(devices)


def context_text(snapshot: HassSnapshot) -> str:
    """The household's context for the LLM prompt (see `prompt.context_text`), capped."""
    return prompt.context_text(*prompt_names(snapshot))


def household_data(snapshot: HassSnapshot) -> dict[str, Any]:
    """What `household.json` holds (see the module docstring)."""
    areas = sorted({n for n in (plain_name(a) for a in snapshot.areas) if n})
    devices: dict[str, dict[str, str]] = {}
    unplaced: dict[str, dict[str, str]] = {}
    for entity in snapshot.entities:
        name = plain_name(entity.name)
        if entity.domain not in DOMAINS or name is None or name in devices or name in unplaced:
            continue
        area = plain_name(entity.area) if entity.area else None
        if area in areas:
            devices[name] = {"name": name, "domain": entity.domain, "area": area}
        else:
            unplaced[name] = {"name": name, "domain": entity.domain}
    household = {"name": "home", "split": "household", "speakers": [], "areas": areas}
    household["devices"] = [devices[n] for n in sorted(devices)]
    prompt_areas, prompt_devices = prompt_names(snapshot)
    return {
        "areas": prompt_areas,
        "devices": prompt_devices,
        "households": [household],
        "home_assistant": {
            "exposed_entities": len(snapshot.entities),
            "exposure_known": snapshot.exposure_known,
            "unplaced_devices": [unplaced[n] for n in sorted(unplaced)],
        },
    }


def cached_context(path: Path) -> str:
    """The context text a previous run saved in `household.json` ("" when there is none or it is bad)."""
    if not Path(path).is_file():
        return ""
    try:
        return load_context_file(path)
    except ValueError as err:
        _LOGGER.warning("ignoring the saved household context: %s", err)
        return ""


# ------------------------------------------------------------------------------ background refresh
class HassContext:
    """The household context from Home Assistant, refreshed in the background; call it for the text."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        data_dir: Path | None = None,
        refresh_s: float = DEFAULT_REFRESH_MINUTES * 60,
        initial: str = "",
        fetch_timeout: float = FETCH_TIMEOUT_S,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        websocket_url(url)  # a clear error now rather than in the background
        if not token:
            raise ValueError("--hass-url needs --hass-token (or WYOMING_TINYALIGN_HASS_TOKEN)")
        if refresh_s <= 0:
            raise ValueError("--hass-refresh-minutes must be positive")
        self.url, self._token = url, token
        self.path = data_dir / HOUSEHOLD_FILE if data_dir is not None else None
        self.refresh_s, self.fetch_timeout = refresh_s, fetch_timeout
        self.backoff_first_s, self.backoff_max_s = backoff_first_s, min(backoff_max_s, refresh_s)
        self.text = initial
        self.fetches = 0  # good fetches
        self.failures = 0  # failures since the last good fetch
        self.last_error: str | None = None
        self.updated = asyncio.Event()  # set after each good fetch (tests and start-up logging)
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> str:
        return self.text

    async def start(self, app: Any = None) -> None:
        """Start the background task and return at once (a server service: `app` is not needed)."""
        if self._task is None:
            _LOGGER.info("household context: from Home Assistant at %s", self.url)
            self._task = asyncio.create_task(self._run(), name="home assistant context")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5.0)
            self._task = None

    async def refresh(self) -> None:
        """One fetch; on success the context (and `household.json`) are updated. Raises `HassError`."""
        snapshot = await fetch_snapshot(self.url, self._token, self.fetch_timeout)
        text = context_text(snapshot)
        if self.path is not None:
            try:
                await asyncio.to_thread(_write_if_changed, self.path, household_data(snapshot))
            except OSError as err:  # the prompt context still updates
                _LOGGER.warning("cannot write %s: %s", self.path, err)
        changed = text != self.text
        self.text = text
        self.fetches += 1
        self.failures, self.last_error = 0, None
        self.updated.set()
        log = _LOGGER.info if changed or self.fetches == 1 else _LOGGER.debug
        log(
            "home assistant: %d exposed entities%s; context: %s",
            len(snapshot.entities), "" if snapshot.exposure_known else " (default domains)", text,
        )  # fmt: skip

    async def _run(self) -> None:
        delay = self.backoff_first_s
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever happens, keep serving with the last context
                self.failures += 1
                self.last_error = str(err) or type(err).__name__
                level = logging.ERROR if isinstance(err, HassAuthError) else logging.WARNING
                _LOGGER.log(
                    level if self.failures == 1 else logging.DEBUG,
                    "home assistant context from %s unavailable (%s); keeping the last context; "
                    "retrying in %.0f s",
                    self.url, self.last_error, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            delay = self.backoff_first_s
            await asyncio.sleep(self.refresh_s)


def _write_if_changed(path: Path, data: dict[str, Any]) -> None:
    content = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    try:
        if path.read_bytes() == content:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, content)
