"""Screenshots of the household's page for the docs (docs/web-dashboard.png, docs/web-interactions.png,
docs/web-learning.png):

    .venv/bin/python tests/screenshots.py [--out docs] [--model BUNDLE]

A real server (the micro dev model, built here unless --model names a bundle) with utterances spoken by
espeak-ng and logged through Wyoming, two of them corrected through the API, the newest being corrected in
the page. The docs' pictures are taken with the README's demo model (`--model data/models/dev-small`),
which hears most of SAID right and, in the voices of unseen households, mishears two; the micro model hears
noise. Its nightly numbers would be noise too: the learning page shows an EXAMPLE history (invented runs
and versions, the versions being copies of the bundle's projector), written into the data dir before the
server starts. Headless Debian chromium, as in test_web_ui.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import tempfile
import time
import zlib
from dataclasses import replace
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from urllib.request import Request, urlopen

import numpy as np
import torch
from playwright.sync_api import Browser, sync_playwright
from serving import CHROMIUM, PAGE_LINK, ServerProcess, say_all, serve_args

from wyoming_tinyalign.devmodel import build_dev_model
from wyoming_tinyalign.model.bundle import load_projector
from wyoming_tinyalign.store import InteractionStore
from wyoming_tinyalign.versions import Versions

VIEWPORT = {"width": 900, "height": 600}
SAID = [  # (text, satellite, espeak voice), oldest first; the third and fifth voices are unseen households'
    ("turn off the hallway light", "hallway", "en-gb"),
    ("set the living room light to forty percent", "living room", "en-us"),
    ("is the coffee maker on", "kitchen", "en-029"),
    ("start a timer for ten minutes", "kitchen", "en-us"),
    ("turn on the porch light", "porch", "de"),
]
CORRECTIONS = [  # (index in SAID, intent) typed through the API
    (1, {"name": "HassLightSet", "slots": {"area": "living room", "brightness": "40"}}),
    (2, {"name": "HassGetState", "slots": {"name": "coffee maker", "state": "on"}}),
]
# An example week: (status, version, the cascade's household intent accuracy and WER before -> after the
# night's decoder adapters, the night's reason). The cascade answers (`--path auto`); the projector's
# aligned path stays behind it.
NIGHTS = [
    (
        "promoted",
        "v0001",
        (0.42, 0.38),
        (0.55, 0.30),
        "decoder: better for the household (intent accuracy 0.42 -> 0.55), not worse on other voices",
    ),
    ("skipped", None, None, None, "only 6 new labels; at least 20 are needed (--min-new)"),
    (
        "rejected",
        "v0002",
        (0.55, 0.30),
        (0.58, 0.29),
        "decoder: better for the household (intent accuracy 0.55 -> 0.58) but worse on other voices: "
        "intent accuracy 0.81 -> 0.74 (tolerance 0.02)",
    ),
    (
        "promoted",
        "v0003",
        (0.55, 0.30),
        (0.63, 0.26),
        "decoder: better for the household (intent accuracy 0.55 -> 0.63), not worse on other voices",
    ),
    ("skipped", None, None, None, "the labelled data has not changed since the last run"),
    (
        "promoted",
        "v0004",
        (0.63, 0.26),
        (0.71, 0.21),
        "decoder: better for the household (intent accuracy 0.63 -> 0.71), not worse on other voices",
    ),
    (
        "rejected",
        "v0005",
        (0.71, 0.21),
        (0.70, 0.22),
        "decoder: worse for the household: intent accuracy 0.7 vs 0.71 served",
    ),
]
ALIGNED = {"household": {"intent_accuracy": 0.31, "wer": 0.45}, "general": {"intent_accuracy": 0.8}}
PROJECTOR = "projector: no better for the household: no more of its utterances better than worse; "


def example_history(data: Path, bundle: Path) -> None:
    """The EXAMPLE runs and versions (see the module's docstring)."""
    projector, info = load_projector(bundle / "projector.safetensors")
    versions = Versions(data)
    store = InteractionStore(data / "log")
    store.open()
    last = datetime.combine(date.today(), dtime(3, 0))
    if last > datetime.now():
        last -= timedelta(days=1)
    for n, (status, version, before, after, reason) in enumerate(NIGHTS):
        started = (last - timedelta(days=len(NIGHTS) - 1 - n)).timestamp()
        report: dict = {"data": {"new": 6 if status == "skipped" else 20 + 7 * n}, "duration_s": 4.0}
        if before is not None and after is not None:
            other = 0.74 if "but worse on other" in reason else 0.82
            cascade = {
                "before": {"household": {"n": 10 + 2 * n, "intent_accuracy": before[0], "wer": before[1]},
                           "general": {"intent_accuracy": 0.81}},
                "after": {"household": {"n": 10 + 2 * n, "intent_accuracy": after[0], "wer": after[1]},
                          "general": {"intent_accuracy": other}},
            }  # fmt: skip
            kept = status == "promoted"
            report = {
                "data": {"train": 40 + 8 * n, "heldout": 10 + 2 * n, "new": 20 + 7 * n,
                         "sources": {"correction": 12 + 3 * n, "teacher": 25 + 4 * n, "outcome": 13 + n}},
                "before": ALIGNED, "after": ALIGNED,
                "cascade": cascade["before"],
                "decoder": {**cascade, "promoted": kept,
                            "loss_curve": [round(0.3 + 1.4 * 0.8**e, 4) for e in range(20)]},
                "served": {
                    "path_auto": {"before": "cascade", "after": "cascade"},
                    "aligned": {"before": ALIGNED, "after": ALIGNED},
                    "cascade": {"before": cascade["before"], "after": cascade["after" if kept else "before"]},
                },
                "train": {"loss_curve": [[10.0 * i, round(0.9 * 0.82**i + 0.2, 4)] for i in range(1, 31)]},
                "duration_s": 420.0 + 15 * n,
                "peak_rss_mb": 1480.0 + 12 * n,
            }  # fmt: skip
            reason = PROJECTOR + reason
        if version is not None:
            household = {"intent_accuracy": after[0], "wer": after[1]}
            metrics = {"household": ALIGNED["household"], "cascade": {"household": household}}
            decided = started + report["duration_s"]
            if status == "promoted":
                metrics["promoted_at"] = decided
            else:
                metrics["rejected"] = {"reason": reason, "at": decided}
            name = versions.add(projector, replace(info, trained=True, metrics=metrics))
            if status == "promoted":
                versions.promote(name)
            assert name == version
        store.conn.execute(
            "INSERT INTO adaptations (started_at, finished_at, status, reason, version, report) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (started, started + report["duration_s"], status, reason, version, json.dumps(report)),
        )
    versions.prune(keep=5)  # as each night does: the older rejected candidate goes
    store.close()


def call(link: str, token: str, method: str, path: str, body: object = None) -> dict:
    """The JSON API with the token."""
    request = Request(
        link.split("?")[0] + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--model", type=Path, help="a bundle folder (default: build the micro dev model)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or work / "model"
        if args.model is None:
            torch.set_num_threads(1)  # a tiny model gains nothing from more, and loses much under load
            build_dev_model(model, "micro", seed=0)
        data = work / "data"
        example_history(data, model)
        extra = ["--uri", "tcp://127.0.0.1:0", "--web-port", "0", "--path", "auto", "--adapt-at", "03:00"]
        server = ServerProcess(serve_args(model, data, *extra), work / "server.log")
        try:
            server.wait_ready()
            link = server.wait_log(PAGE_LINK).group(1)
            say_all(*server.host_port, work, SAID)
            token = (data / "web-token").read_text().strip()
            while len(items := call(link, token, "GET", "api/interactions")["items"]) < len(SAID):
                time.sleep(0.1)  # the log is written in the background
            ids = [item["id"] for item in reversed(items)]  # oldest first, as SAID
            for index, intent in CORRECTIONS:
                body = {"text": SAID[index][0], "intent": intent}
                call(link, token, "PUT", f"api/interactions/{ids[index]}/correction", body)
            shoot(link, args.out)
        finally:
            server.stop()
    for name in ("dashboard", "interactions", "learning"):
        path = args.out / f"web-{name}.png"
        print(f"{path}: {path.stat().st_size // 1024} KB")


def shoot(link: str, out: Path) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(link)
        save(browser, page.screenshot(), out / "web-dashboard.png")
        page.click("nav >> text=Interactions")
        row = page.locator("tr.row").first  # the newest
        row.locator("button.fix").click()
        form = page.locator("tr.editing form")
        form.locator("input[name=text]").fill(SAID[-1][0])
        form.locator("select[name=intent]").select_option("HassTurnOn")
        form.locator("input[name=slot-name]").fill("porch light")
        save(browser, page.screenshot(full_page=True), out / "web-interactions.png")
        page.click("nav >> text=Learning")
        runs = page.locator("table.runs").bounding_box()  # down to the first few runs
        assert runs is not None
        clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": runs["y"] + 300}
        save(browser, page.screenshot(full_page=True, clip=clip), out / "web-learning.png")
        browser.close()


# Decoded by the browser (no image library here): the pixels of a PNG, base64, with its size.
PIXELS = """async (png) => {
  const img = new Image();
  img.src = "data:image/png;base64," + png;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.width;
  canvas.height = img.height;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, img.width, img.height).data;
  let text = "";
  for (let i = 0; i < px.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, px.subarray(i, i + 0x8000));
  }
  return [img.width, img.height, btoa(text)];
}"""


def save(browser: Browser, png: bytes, path: Path) -> None:
    """Write a screenshot as an indexed PNG of its 256 most frequent colours (a fraction of the size)."""
    page = browser.new_page()
    width, height, raw = page.evaluate(PIXELS, base64.b64encode(png).decode())
    page.close()
    rgb = np.frombuffer(base64.b64decode(raw), np.uint8).reshape(height, width, 4)[..., :3].astype(np.int64)
    keys = (rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel()
    colours, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    split = np.stack([colours >> 16, colours >> 8 & 255, colours & 255], axis=1)
    palette = split[np.argsort(-counts, kind="stable")[:256]]
    nearest = np.concatenate(
        [((chunk[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1) for chunk in np.array_split(split, 64)]
    )
    index = nearest[inverse].reshape(height, width).astype(np.uint8)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), index], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    main()
