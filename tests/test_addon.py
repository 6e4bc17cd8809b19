"""The Home Assistant add-on, checked against the Supervisor's rules (home-assistant/supervisor:
`supervisor/addons/validate.py`, `supervisor/addons/options.py`, `supervisor/validate.py`), and its s6
scripts run with a stand-in `bashio`: the options become real `serve` flags, and discovery is published
only once the server answers `describe`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from serving import free_port
from wyoming.event import async_read_event, async_write_event
from wyoming.info import Describe

import wyoming_tinyalign
from wyoming_tinyalign.__main__ import build_parser
from wyoming_tinyalign.handler import ServerSettings, build_info

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon"
ROOTFS = ADDON / "rootfs"
S6 = ROOTFS / "etc/s6-overlay/s6-rc.d"
RUN = S6 / "tinyalign/run"
DISCOVERY = S6 / "discovery/run"
TIMEOUT = 30.0

# The Supervisor's rules.
ARCH_ALL = {"armhf", "armv7", "aarch64", "amd64", "i386"}
RE_SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
RE_SCHEMA_ELEMENT = re.compile(
    r"^(?:"
    r"|bool"
    r"|email"
    r"|url"
    r"|port"
    r"|device(?:\((?P<filter>subsystem=[a-z]+)\))?"
    r"|str(?:\((?P<s_min>\d+)?,(?P<s_max>\d+)?\))?"
    r"|password(?:\((?P<p_min>\d+)?,(?P<p_max>\d+)?\))?"
    r"|int(?:\((?P<i_min>\d+)?,(?P<i_max>\d+)?\))?"
    r"|float(?:\((?P<f_min>[\d\.]+)?,(?P<f_max>[\d\.]+)?\))?"
    r"|match\((?P<match>.*)\)"
    r"|list\((?P<list>.+)\)"
    r")\??$"
)
RE_VOLUME = re.compile(
    r"^(data|config|ssl|addons|backup|share|media|homeassistant_config|all_addon_configs|addon_config)"
    r"(?::(rw|ro))?$"
)
RE_DOCKER_PORT = re.compile(r"^\d+(?:/tcp|/udp)?$")
RE_DOCKER_IMAGE_BUILD = re.compile(r"^([a-zA-Z\-\.:\d{}]+/)*?([\-\w{}]+)/([\-\w{}]+)(:[\.\-\w{}]+)?$")
REQUIRED = ("name", "version", "slug", "description", "arch")

# Options whose `serve` flag comes with another issue (the nightly adaptation): while `serve` has no such
# flag the option is validated but not mapped; once the flag exists it must be mapped like the others.
PENDING = {"adaptation_time": "--adapt-at"}
WEB_PORT = 8099  # the ingress port: `serve --web-port` (the web UI) must default to it
# A valid value other than the default, for options whose type does not say one.
SAMPLES = {
    "language": "de",
    "custom_model": "/config/models/mine",
    "adaptation_time": "off",
    "min_confidence": "off",
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load(ADDON / "config.yaml")


def validate_option(typ: str, value: Any) -> bool:
    """Is `value` valid for a schema element, the way the Supervisor checks it (but without coercion)?"""
    match = RE_SCHEMA_ELEMENT.match(typ)
    assert match, f"unknown schema type {typ!r}"
    bounds = {k[2:]: float(v) for k, v in match.groupdict().items() if v and k[1:2] == "_"}
    kind = typ.split("(")[0].rstrip("?")
    if kind in ("str", "password"):
        return isinstance(value, str)
    if kind in ("int", "float", "port"):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "int":
            number = number and isinstance(value, int)
        if kind == "port":
            bounds = {"min": 1, "max": 65535}
        return number and bounds.get("min", value) <= value <= bounds.get("max", value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "match":
        return isinstance(value, str) and re.match(match.group("match"), value) is not None
    if kind == "list":
        return str(value) in match.group("list").split("|")
    if kind == "url":
        return isinstance(value, str) and urlsplit(value).scheme in ("http", "https")
    raise AssertionError(f"no check for {typ!r}")


# ---------------------------------------------------------------------------------------- config
def test_config_follows_the_supervisors_rules(config: dict[str, Any]) -> None:
    for key in REQUIRED:
        assert config.get(key), f"config.yaml: {key} is required"
    assert RE_SLUG.match(config["slug"])
    assert isinstance(config["version"], str) and isinstance(config["homeassistant"], str)  # not floats
    assert config["arch"] == ["amd64", "aarch64"] and set(config["arch"]) <= ARCH_ALL
    assert urlsplit(config["url"]).scheme == "https"
    assert config["init"] is False  # s6-overlay is the init
    assert config["discovery"] == ["wyoming"]
    assert config["homeassistant_api"] is True
    assert config["ports"] == {"10300/tcp": 10300}
    for port, host in config["ports"].items():
        assert RE_DOCKER_PORT.match(port) and (host is None or 1 <= host <= 65535)
    assert set(config["ports_description"]) == set(config["ports"])
    assert config["ingress"] is True and config["ingress_port"] == WEB_PORT
    assert all(RE_VOLUME.match(entry) for entry in config["map"]) and "addon_config:rw" in config["map"]
    assert all(isinstance(p, str) for p in config["backup_exclude"])
    assert {"cache/**", "huggingface/**"} <= set(config["backup_exclude"])


def test_options_are_valid_for_their_schema(config: dict[str, Any]) -> None:
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema), "every option needs a schema entry"
    for key, typ in schema.items():
        assert isinstance(typ, str) and RE_SCHEMA_ELEMENT.match(typ), f"schema {key}: {typ!r}"
        if key in options:
            assert validate_option(typ, options[key]), f"option {key}={options[key]!r} is not {typ}"
        else:
            assert typ.endswith("?"), f"option {key} is required by its schema but has no default"
    for key, value in SAMPLES.items():
        assert validate_option(schema[key], value), key
    # The model list is what `serve --model` accepts (plus `custom`, which reads custom_model).
    from wyoming_tinyalign.models import DEV, PRESET_PREFIX, PRESETS

    models = set(schema["model"][len("list(") : -1].split("|"))
    assert models == {DEV, "custom", *(PRESET_PREFIX + name for name in PRESETS)}
    paths = set(schema["path"][len("list(") : -1].split("|"))
    assert paths == set(_serve_action("--path").choices)
    assert not validate_option(schema["adaptation_time"], "25:00")
    assert validate_option(schema["adaptation_time"], "04:30")
    assert not validate_option(schema["retention_days"], -1)


def test_build_yaml_translations_docs_changelog_and_repository(config: dict[str, Any]) -> None:
    build = load(ADDON / "build.yaml")
    assert set(build["build_from"]) == set(config["arch"])
    assert all(RE_DOCKER_IMAGE_BUILD.match(image) for image in build["build_from"].values())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in build["args"].items())
    assert build["args"]["WYOMING_TINYALIGN_VERSION"] == wyoming_tinyalign.__version__
    dockerfile = (ADDON / "Dockerfile").read_text()
    assert re.search(r"^ARG BUILD_FROM\nFROM \$\{?BUILD_FROM\}?$", dockerfile, re.M)
    for arg in build["args"]:
        assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), f"build arg {arg} is not declared"
    assert re.search(r"^COPY rootfs /$", dockerfile, re.M)
    assert "python3 -m wyoming_tinyalign.healthcheck" in dockerfile

    translations = load(ADDON / "translations/en.yaml")
    assert set(translations["configuration"]) == set(config["schema"])
    for key, text in translations["configuration"].items():
        assert text["name"] and text["description"], key
    assert set(translations["network"]) == set(config["ports"])

    docs = (ADDON / "DOCS.md").read_text()
    for heading in ("Installation", "Discovery", "Options", "Privacy", "nightly adaptation", "Rollback"):
        assert heading in docs, heading
    for key in config["schema"]:
        assert f"**`{key}`**" in docs, f"DOCS.md does not explain option {key}"
    assert f"## {config['version']}" in (ADDON / "CHANGELOG.md").read_text()

    repository = load(ROOT / "repository.yaml")
    assert repository["name"] and repository["maintainer"]
    assert config["url"].startswith(repository["url"])


# ------------------------------------------------------------------------------------ s6 scripts
def test_s6_services_are_complete_and_scripts_parse() -> None:
    services = {p.name for p in S6.iterdir() if p.is_dir() and p.name != "user"}
    assert services == {"tinyalign", "discovery"}
    assert {p.name for p in (S6 / "user/contents.d").iterdir()} == services
    for name in services:
        kind = (S6 / name / "type").read_text().strip()
        assert kind in ("longrun", "oneshot"), name
        deps = S6 / name / "dependencies.d"
        for dep in deps.iterdir() if deps.is_dir() else ():
            assert dep.name in services | {"base"}, f"{name} depends on unknown {dep.name}"
    assert (S6 / "tinyalign/type").read_text().strip() == "longrun"
    assert (S6 / "discovery/type").read_text().strip() == "oneshot"
    assert (S6 / "discovery/dependencies.d/tinyalign").exists()  # discovery waits for the server
    up = (S6 / "discovery/up").read_text().split()
    assert len(up) == 1 and (ROOTFS / up[0].lstrip("/")) == DISCOVERY
    scripts = [p for p in S6.rglob("*") if p.name in ("run", "finish")]
    assert len(scripts) == 3
    for script in scripts:
        assert script.read_text().startswith("#!/command/with-contenv bashio\n"), script
        assert os.access(script, os.X_OK), f"{script} is not executable"
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


# A stand-in for bashio: the functions the scripts use, options from a bash associative array.
FAKE_BASHIO = r"""
set -o errexit -o nounset -o pipefail
source "${OPTIONS_FILE}"
bashio::config() { if [[ -v "OPTS[$1]" ]]; then printf '%s\n' "${OPTS[$1]}"; else echo null; fi; }
bashio::config.true() { [[ "$(bashio::config "$1")" == "true" ]]; }
bashio::config.false() { [[ "$(bashio::config "$1")" == "false" ]]; }
bashio::config.has_value() { local v; v="$(bashio::config "$1")"; [[ "${v}" != "null" && -n "${v}" ]]; }
bashio::log.info() { echo "INFO: $*" >&2; }
bashio::log.warning() { echo "WARNING: $*" >&2; }
bashio::log.error() { echo "ERROR: $*" >&2; }
bashio::exit.nok() { echo "FATAL: $*" >&2; exit 1; }
bashio::var.json() {
    python3 -c 'import json, sys; a = sys.argv[1:]; print(json.dumps(dict(zip(a[::2], a[1::2]))))' "$@"
}
bashio::discovery() { printf '%s %s\n' "$1" "$2" >> "${DISCOVERY_OUT}"; }
"""
# Stands in for `wyoming-tinyalign`: records how it was started.
FAKE_SERVER = """import json, os, sys
keep = ("WYOMING_TINYALIGN_", "HF_HOME", "XDG_CACHE_HOME")
env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
json.dump({"argv": sys.argv[1:], "env": env}, open(os.environ["CAPTURE"], "w"))
"""
SUPERVISOR_TOKEN = "supervisor-token-123"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ with `python3` (this interpreter) and the fake `wyoming-tinyalign`, and the fake bashio."""
    work = tmp_path_factory.mktemp("addon")
    (work / "bin").mkdir()
    python = work / "bin/python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    fake = work / "bin/wyoming-tinyalign"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    fake.chmod(0o755)
    (work / "bashio.sh").write_text(FAKE_BASHIO)
    return work


def run_script(
    sandbox: Path, script: Path | str, options: dict[str, Any], tag: str, token: str | None = SUPERVISOR_TOKEN
) -> subprocess.Popen:
    values = " ".join(
        f"[{k}]={shlex.quote(json.dumps(v) if not isinstance(v, str) else v)}" for k, v in options.items()
    )
    (sandbox / f"{tag}.options").write_text(f"declare -A OPTS=({values})\n")
    env = {
        "PATH": f"{sandbox / 'bin'}:{os.environ['PATH']}",
        "OPTIONS_FILE": str(sandbox / f"{tag}.options"),
        "CAPTURE": str(sandbox / f"{tag}.json"),
        "DISCOVERY_OUT": str(sandbox / f"{tag}.discovery"),
        "HOME": str(sandbox),
    } | ({"SUPERVISOR_TOKEN": token} if token is not None else {})
    (sandbox / f"{tag}.json").unlink(missing_ok=True)
    return subprocess.Popen(
        ["bash", "-c", 'source "$1"; source "$2"', "bash", str(sandbox / "bashio.sh"), str(script)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def started_with(sandbox: Path, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tag: str) -> dict:
    """Run the service's run script; returns the parsed `serve` flags and the environment it set."""
    proc = run_script(sandbox, RUN, options, tag)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert "command not found" not in stderr, stderr
    captured = json.loads((sandbox / f"{tag}.json").read_text())
    with monkeypatch.context() as patch:  # parse exactly as the real command would, env included
        for key in [k for k in os.environ if k.startswith("WYOMING_TINYALIGN_")]:
            patch.delenv(key)
        for key, value in captured["env"].items():
            patch.setenv(key, value)
        args = build_parser().parse_args(captured["argv"])
    return {"args": vars(args), "env": captured["env"]}


def _serve_action(flag: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return next(a for a in sub.choices["serve"]._actions if flag in a.option_strings)


def test_the_run_script_starts_the_server_with_the_options(
    sandbox: Path, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    started = started_with(sandbox, config["options"], monkeypatch, "defaults")
    args, env = started["args"], started["env"]
    assert args["command"] == "serve"
    assert args["uri"] == "tcp://0.0.0.0:10300" and str(args["data_dir"]) == "/data"
    assert (args["model"], args["language"], args["device"], args["path"]) == ("dev", "en", "cpu", "auto")
    assert args["retention_days"] == 30.0 and not args["no_log"] and not args["no_log_audio"]
    for option in ("retention_mb", "min_free_mb"):  # the add-on's defaults are the server's
        flag = "--" + option.replace("_", "-")
        assert args[option] == config["options"][option] == _serve_action(flag).default
    minutes = config["options"]["adaptation_minutes"]  # the add-on's default is the server's
    assert args["adapt_budget_minutes"] == minutes == _serve_action("--adapt-budget-minutes").default
    assert args["hass_url"] == "ws://supervisor/core/websocket"
    assert args["hass_token"] == SUPERVISOR_TOKEN and env["WYOMING_TINYALIGN_HASS_TOKEN"] == SUPERVISOR_TOKEN
    assert env["HF_HOME"] == "/data/huggingface" and env["XDG_CACHE_HOME"] == "/data/cache"
    assert args["debug"] is False
    # The web page, where Home Assistant's ingress proxy (another container) reaches it.
    assert args["web_host"] == "0.0.0.0" and args["web_port"] == config["ingress_port"] == WEB_PORT


def test_every_option_is_mapped_to_the_server(
    sandbox: Path, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing any option (other than those waiting for a flag) changes how the server is started."""
    options, schema = config["options"], config["schema"]
    base = started_with(sandbox, options, monkeypatch, "base")
    for key, typ in schema.items():
        if key in waiting():
            continue
        value = options.get(key)
        if key in SAMPLES:
            alt = SAMPLES[key]
        elif typ.startswith("list("):
            alt = next(v for v in typ[len("list(") : -1].split("|") if v != value and v != "custom")
        elif typ == "bool":
            alt = not value
        elif typ.startswith("int("):
            alt = value + 1
        else:
            raise AssertionError(f"add a sample value for option {key} ({typ})")
        assert validate_option(typ, alt)
        changed = {**options, key: alt} | ({"model": "custom"} if key == "custom_model" else {})
        result = started_with(sandbox, changed, monkeypatch, key)
        assert result != base, f"option {key} does not reach the server"
    custom = started_with(sandbox, {**options, "model": "custom", **SAMPLES}, monkeypatch, "custom")
    assert custom["args"]["model"] == "/config/models/mine"
    off = started_with(sandbox, {**options, "household_context": False}, monkeypatch, "no-hass")
    assert off["args"]["hass_url"] is None and "WYOMING_TINYALIGN_HASS_TOKEN" not in off["env"]


def waiting() -> set[str]:
    """The options of `PENDING` whose flag `serve` does not have (yet)."""
    return {key for key, flag in PENDING.items() if not _has_flag(flag)}


def _has_flag(flag: str) -> bool:
    try:
        _serve_action(flag)
    except StopIteration:
        return False
    return True


def test_options_waiting_for_a_flag_are_not_mapped_yet(config: dict[str, Any]) -> None:
    run = RUN.read_text()
    assert set(PENDING) <= set(config["schema"])
    for key in waiting():
        assert f"'{key}'" not in run, f"{key} is mapped to {PENDING[key]}, which serve does not have"
    if _has_flag("--web-port"):  # the web UI: Home Assistant's ingress reaches it on ingress_port
        assert _serve_action("--web-port").default == config["ingress_port"]


def test_without_a_supervisor_token_it_starts_without_household_context(
    sandbox: Path, config: dict[str, Any]
) -> None:
    proc = run_script(sandbox, RUN, config["options"], "no-token", token=None)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and "No Supervisor token" in stderr
    captured = json.loads((sandbox / "no-token.json").read_text())
    assert "--hass-url" not in captured["argv"] and "WYOMING_TINYALIGN_HASS_TOKEN" not in captured["env"]


def test_custom_model_without_a_folder_stops_with_a_clear_message(
    sandbox: Path, config: dict[str, Any]
) -> None:
    proc = run_script(sandbox, RUN, {**config["options"], "model": "custom"}, "custom-missing")
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and "custom_model is not set" in stderr
    assert not (sandbox / "custom-missing.json").exists()  # the server was not started


async def test_discovery_waits_for_describe_then_publishes(sandbox: Path) -> None:
    """The oneshot publishes `tcp://<hostname>:10300` only after a real describe -> info round trip."""
    port = free_port()
    script = sandbox / "discovery-run"
    script.write_text(DISCOVERY.read_text().replace("10300", str(port)))  # 10300 may be taken here
    out = sandbox / "discovery.discovery"
    out.unlink(missing_ok=True)
    proc = run_script(sandbox, script, {}, "discovery")
    info = build_info("micro", "test", None, ServerSettings()).event()
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        event = await asyncio.wait_for(async_read_event(reader), TIMEOUT)
        if event is not None and Describe.is_type(event.type):
            await async_write_event(info, writer)
        writer.close()

    try:
        await asyncio.sleep(3.0)  # the script polls every 2 s: nothing may be published yet
        assert proc.poll() is None and not out.exists()
        server = await asyncio.start_server(answer, "127.0.0.1", port)
        async with server:
            returncode = await asyncio.wait_for(asyncio.to_thread(proc.wait), TIMEOUT)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert returncode == 0, stderr
        assert "command not found" not in stderr
        service, payload = out.read_text().strip().split(" ", 1)
        assert service == "wyoming"
        assert json.loads(payload) == {"uri": f"tcp://{socket.gethostname()}:{port}"}
        assert connections >= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
