"""Personalization benchmark: one night of household adaptation, before and after, and its cost.

    python benchmarks/personalization.py --model /tmp/small --work /tmp/bench-personal [--quick]

1. Quality: for each of the 3 unseen households (voices, accents and device names the dev model never
   trained on), 100 utterances are logged as the server logs them and corrected to their true text and
   intent (labels = corrections), then one `wyoming-tinyalign adapt --now` night runs in its own process
   (`--budget-minutes`, `--threads`). Intent accuracy and WER on the household's separate held-out
   utterances (never logged), aligned path with the household's context, before and after; the target
   is the error rate at least halved. Beside them, the frozen LLM's intent accuracy given each
   reference transcript: the most a perfect ear could reach. A candidate the night rejected (kept as a
   version) is scored on the same held-out utterances, with its Whisper decoder adapters on the
   cascade too: what the gate refused, measured on the truth. A second table gives what `--path auto`
   serves before (day 0: the cascade) and after, and the cascade with the night's decoder adapters.
   `--labels teacher` is the household that corrects nothing: the utterances are logged as a day-0
   server (`--path auto`: the cascade) logs them, with Whisper's transcript and confidence and no
   intent, so the night's labels are the teacher's alone (those at `adapt --teacher-min-confidence`
   or above: set it with `--job-args`). The report gives how many the night labelled so (their
   `label_source` in the log) and their WER against the true text. `--labels some` is the household
   that corrects `--corrected` of each day's utterances (spread over the day) and leaves the rest to
   the teacher. `--nights N` is N days in a row:
   each logs `--labelled` new utterances, then its night runs on all labels so far, from the version
   then served, and the served model is scored on the held-out utterances after each night.
   `--households harbour,alpine` runs only those (each with the seeds it has in a full run).
   `--one-voice` runs each of their 8 voices alone as a household of one (`--households
   highland,harb-kim` picks highland's voices and kim).
2. Cost at real size: the same job on 200 corrected utterances with whisper-base + Qwen2.5-0.5B shapes
   (random weights; the compute is real, the words are not): its wall time and peak RSS (the job
   process's `ru_maxrss`); targets <= 10 minutes and <= 3 GB on 2 cores. `--real-size-dtype float32
   --real-size-dtype bfloat16` runs it with the backbones in each precision, side by side. The night
   fine-tunes with the loss the dev model's projector was aligned with (`--real-size-objective`
   overrides it): a combined night runs the LLM forward and backward, an EmbedLink night does not.

Prints markdown tables (for benchmarks/RESULTS.md) and writes every figure to WORK/personalization.json.
`--quick` is a smoke run (few utterances, short budgets, 16 real-size utterances). Base-household speech
for replay and the general held-out set is rendered once into WORK/bootstrap and shared by the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from realsize import qwen25_05b, whisper_base
from transformers import GenerationConfig, WhisperFeatureExtractor

from wyoming_tinyalign.evaluate import evaluate_items, evaluate_text, word_edits, word_error_rate
from wyoming_tinyalign.households import Household, context_text, load_households
from wyoming_tinyalign.labels import set_correction, validate_correction
from wyoming_tinyalign.manifest import Utterance, load_utterances, read_manifest
from wyoming_tinyalign.model.bundle import (
    BundleConfig,
    ProjectorInfo,
    load_bundle_config,
    load_projector,
    save_bundle_config,
    save_projector,
)
from wyoming_tinyalign.model.projector import ProjectorConfig, build_projector
from wyoming_tinyalign.model.speechllm import SpeechLLM, resolve_ref
from wyoming_tinyalign.store import DB_FILE, Interaction, InteractionStore
from wyoming_tinyalign.synth import render_corpus
from wyoming_tinyalign.train import OBJECTIVES
from wyoming_tinyalign.versions import Versions, load_household_model, record_model
from wyoming_tinyalign.worker import choose_path

_LOGGER = logging.getLogger("personalization")
# What the tables give of a night's decoder adapters (report["decoder"]).
DECODER_KEYS = ("promoted", "reason", "skipped", "steps", "epochs", "train_s", "after", "examples")
LABEL_MODES = {
    "corrections": "corrections",
    "teacher": "the teacher alone (nothing corrected)",
    "some": "corrections of {corrected} a day, the teacher for the rest",
}


def correct(conn: sqlite3.Connection, row: int, utterance: Utterance) -> None:
    """Correct logged `row` to the utterance's true text and intent, as the review API does."""
    body = {"text": utterance.text, "intent": utterance.intent.to_json() if utterance.intent else None}
    set_correction(conn, row, validate_correction(body))


def log_corrected(data: Path, bundle: Path, manifest: Path, days_ago: int = 2) -> int:
    """A data dir as the server leaves it, every utterance corrected to its true text and intent (logged
    over the day `days_ago`)."""
    record_model(data, bundle, bundle.name)
    store = InteractionStore(data / "log")
    store.open()
    start = time.time() - days_ago * 86400
    try:
        for i, (utt, audio) in enumerate(load_utterances(manifest)):
            row = store.add(
                Interaction(
                    kind="audio", created_at=start + 300 * i, client="192.168.1.20:40000", path="aligned",
                    satellite_id="living-room", duration_s=audio.size / 16000,
                ),
                audio,
            )  # fmt: skip
            correct(store.conn, row, utt)
        return i + 1
    finally:
        store.close()


def log_heard(
    data: Path, bundle: Path, model: SpeechLLM, manifest: Path, context: str, days_ago: int = 2
) -> dict[int, str]:
    """A data dir as a day-0 server leaves it (the cascade's transcript and confidence with the
    household's `context`, no intent, no correction; logged over the day `days_ago`): the night's labels
    can only be the teacher's. Returns the true text by row id."""
    record_model(data, bundle, bundle.name)
    store = InteractionStore(data / "log")
    store.open()
    start = time.time() - days_ago * 86400
    truth = {}
    try:
        for i, (utt, audio) in enumerate(load_utterances(manifest)):
            heard = model.run(audio, "cascade", context, with_intent=False)
            row = store.add(
                Interaction(
                    kind="audio", created_at=start + 300 * i, client="192.168.1.20:40000", path="cascade",
                    satellite_id="living-room", duration_s=audio.size / 16000, transcript=heard.transcript,
                    confidence=heard.confidence,
                ),
                audio,
            )  # fmt: skip
            truth[row] = utt.text
        return truth
    finally:
        store.close()


def correct_some(data: Path, manifest: Path, rows: list[int], n: int) -> set[int]:
    """Correct `n` of the logged `rows` (one per utterance of `manifest`, in order), spread evenly over
    the day, to their true text and intent; returns their row ids."""
    picked = {rows[k * len(rows) // n] for k in range(min(n, len(rows)))}
    store = InteractionStore(data / "log")
    store.open()
    try:
        for row, utt in zip(rows, read_manifest(manifest), strict=True):
            if row in picked:
                correct(store.conn, row, utt)
    finally:
        store.close()
    return picked


def teacher_label_quality(data: Path, truth: dict[int, str]) -> dict:
    """How many of the logged utterances the night labelled by the teacher (its `label_source`), and how
    wrong those labels were."""
    with closing(sqlite3.connect(data / "log" / DB_FILE)) as conn:
        rows = conn.execute(
            "SELECT id, teacher_transcript FROM interactions WHERE label_source = 'teacher'"
        ).fetchall()
    kept = [(truth[row_id], heard) for row_id, heard in rows]
    return {
        "logged": len(truth),
        "kept": len(kept),
        "kept_wer": round(word_error_rate(*zip(*kept, strict=True)), 4) if kept else None,
        "kept_exact": sum(word_edits(text, heard) == 0 for text, heard in kept),
    }


def household_file(household: Household, path: Path) -> Path:
    """The household's context as `serve --context-file` (and so `adapt --context-file`) reads it."""
    path.write_text(
        json.dumps({"areas": household.areas, "devices": [{"name": d.name} for d in household.devices]})
    )
    return path


def run_night(data: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One `adapt --now` run in its own process; its JSON report."""
    cmd = [
        sys.executable, "-m", "wyoming_tinyalign", "adapt", "--data-dir", str(data), "--now",
        "--budget-minutes", str(args.budget_minutes), "--threads", str(args.threads),
        "--bootstrap-dir", str(args.work / "bootstrap"), "--replay-n", str(args.replay_n),
        "--general-n", str(args.general_n), *shlex.split(args.job_args), *extra,
    ]  # fmt: skip
    _LOGGER.info("running %s", " ".join(cmd))
    with open(data.parent / "adapt.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"adapt failed ({proc.returncode}); see {data.parent / 'adapt.log'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _two(scores: dict) -> dict:
    """The two figures the tables give of a path's scores: intent accuracy and WER."""
    return {k: scores[k] for k in ("intent_accuracy", "wer")}


def evaluate(model: SpeechLLM, manifest: Path, context: str, paths: tuple[str, ...]) -> dict:
    items = [(u, a, context) for u, a in load_utterances(manifest)]
    return {path: evaluate_items(model, items, path) for path in paths}


def benchmark_households(one_voice: bool) -> list[tuple[str, Household]]:
    """The unseen households by name, or with `one_voice` each of their voices alone by its id (a
    household of one: the household's names and devices, one speaker)."""
    unseen = [h for h in load_households() if h.split == "unseen"]
    if one_voice:
        return [(s.id, replace(h, speakers=[s])) for h in unseen for s in h.speakers]
    return [(h.name, h) for h in unseen]


def quality(args: argparse.Namespace) -> list[dict]:
    rows = []
    for i, (name, household) in enumerate(benchmark_households(args.one_voice)):
        if not {name, household.name} & set(args.households):
            continue
        work = args.work / "quality" / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # Night 1's utterances keep the seed one night has always had; each later day has new ones.
        days = [
            render_corpus(work / f"labelled-{k + 1}", [household], args.labelled, seed=100 + i + 1000 * k)
            for k in range(args.nights)
        ]
        heldout = render_corpus(work / "heldout", [household], args.heldout, seed=200 + i)
        data = work / "data"
        household_json = str(household_file(household, work / "household.json"))
        before_model = SpeechLLM.load(args.model)
        context = context_text(household)
        before = evaluate(before_model, heldout, context, ("aligned", "cascade"))
        # The LLM given each reference transcript: what the aligned path reaches at best with a perfect
        # ear (the LLM is frozen; a night changes only the projector).
        ceiling = evaluate_text(
            before_model, [(u, context) for u in read_manifest(heldout) if u.intent is not None]
        )
        truth: dict[int, str] | None = {} if args.labels in ("teacher", "some") else None
        nights = []
        for day, labelled in enumerate(days, 1):
            # Each day is logged before its night; a teacher day as the cascade heard it (what a day-0
            # server logs: the teacher's labels do not depend on what was served).
            days_ago = args.nights - day + 2
            if truth is not None:
                heard = log_heard(data, args.model, before_model, labelled, context, days_ago)
                if args.labels == "some":  # (the corrected rows' labels are not the teacher's)
                    for row in correct_some(data, labelled, list(heard), args.corrected):
                        del heard[row]
                truth |= heard
            else:
                log_corrected(data, args.model, labelled, days_ago)
            t0 = time.monotonic()
            report = run_night(data, args, ["--context-file", household_json])
            wall = time.monotonic() - t0
            after_model, version = load_household_model(data)
            after = evaluate(after_model, heldout, context, ("aligned", "cascade"))
            served_path = choose_path("auto", after_model)
            rejected = None  # what the night refused would have done on the held-out truth
            if report["status"] == "rejected" and report.get("version"):
                versions, paths = Versions(data), ("aligned",)
                after_model.projector, after_model.projector_info = versions.load(report["version"])
                if (adapter := versions.adapter(report["version"])) is not None:  # and its ear
                    after_model.set_decoder_adapter(*adapter)
                    paths = ("aligned", "cascade")
                rejected = {p: _two(r) for p, r in evaluate(after_model, heldout, context, paths).items()}
            del after_model
            nights.append(
                {
                    "night": day,
                    "logged": args.labelled * day,
                    "status": report["status"],
                    "reason": report.get("reason"),
                    "version": version,
                    "after": {p: _two(r) for p, r in after.items()},
                    "served_path": served_path,
                    "decoder": {k: v for k, v in (report.get("decoder") or {}).items() if k in DECODER_KEYS},
                    "rejected": rejected,
                    "teacher_labels": teacher_label_quality(data, truth) if truth is not None else None,
                    "job": {
                        "wall_s": round(wall, 1),
                        "duration_s": report.get("duration_s"),
                        "peak_rss_mb": report.get("peak_rss_mb"),
                        "train": {k: v for k, v in (report.get("train") or {}).items() if k != "history"},
                        "data": report.get("data"),
                        "household_before": (report.get("before") or {}).get("household"),
                        "household_after": (report.get("after") or {}).get("household"),
                        "general_before": (report.get("before") or {}).get("general"),
                        "general_after": (report.get("after") or {}).get("general"),
                        "general_shipped": (report.get("shipped") or {}).get("general"),
                    },
                }
            )
            _LOGGER.info("%s night %d: %s", household.name, day, json.dumps(nights[-1]["after"]))
        del before_model
        last = nights[-1]
        rows.append(
            {
                "household": name,
                "labelled": args.labelled,
                "heldout": args.heldout,
                "before": {p: _two(r) for p, r in before.items()},
                "text_ceiling": round(ceiling, 4),
                **{
                    k: last[k]
                    for k in (
                        "status",
                        "reason",
                        "version",
                        "after",
                        "served_path",
                        "decoder",
                        "rejected",
                        "teacher_labels",
                        "job",
                    )  # fmt: skip
                },
                "nights": nights,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- real size
def real_size_bundle(
    dev: Path, out: Path, objective: str, embedlink_weight: float, *, pad_30s: bool = False
) -> Path:
    """whisper-base + Qwen2.5-0.5B shapes with random weights, saved as a bundle (the dev model's
    tokenizers: their ids fit the big vocabularies; each backbone in the precision its hub checkpoint
    has: float32 Whisper, bfloat16 Qwen), with an untrained BridgeFormer that says it was aligned with
    `objective`, so the night fine-tunes it with that loss. `pad_30s`: the cascade pads to 30 s, as the
    real-backbone presets' does."""
    if (out / "bundle.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    dev_cfg = load_bundle_config(dev)
    dev_whisper = Path(resolve_ref(dev, dev_cfg.encoder))
    torch.manual_seed(0)
    whisper = whisper_base()
    whisper.generation_config = GenerationConfig.from_pretrained(dev_whisper)
    whisper.save_pretrained(out / "whisper")
    del whisper
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out / "whisper")
    dev_model = SpeechLLM.load(dev)
    llm = qwen25_05b(dev_model.tokenizer.pad_token_id, dev_model.tokenizer.eos_token_id)
    llm.to(torch.bfloat16).save_pretrained(out / "llm")  # as Qwen2.5-0.5B-Instruct is on the hub
    dev_model.tokenizer.save_pretrained(out / "llm")
    dev_model.whisper_tokenizer.save_pretrained(out / "whisper")
    embed_norm = float(llm.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())
    del llm, dev_model
    config = ProjectorConfig(kind="bridgeformer", input_dim=512, output_dim=896, embed_norm=embed_norm)
    info = ProjectorInfo(config, "whisper", "llm", objective=objective, embedlink_weight=embedlink_weight)
    save_projector(out / "projector.safetensors", build_projector(config), info)
    save_bundle_config(
        out,
        BundleConfig(
            encoder="whisper", llm="llm", prompt_template=dev_cfg.prompt_template, cascade_pad_30s=pad_30s
        ),
    )
    return out


def dev_objective(dev: Path) -> tuple[str, float]:
    """The objective and EmbedLink weight the dev model's projector was aligned with (its checkpoint's
    record; EmbedLink when it has no projector)."""
    name = load_bundle_config(dev).projector
    if not name:
        return "embedlink", 1.0
    _, info = load_projector(dev / name)
    return info.objective, info.embedlink_weight


def real_size(args: argparse.Namespace, dtype: str) -> dict:
    objective, weight = dev_objective(args.model)
    objective = args.real_size_objective or objective
    pad = "-pad30s" if args.real_size_pad_30s else ""
    folder = args.work / f"real-size-bundle-{objective}{pad}"
    bundle = real_size_bundle(args.model, folder, objective, weight, pad_30s=args.real_size_pad_30s)
    work = args.work / f"real-size-{objective}-{dtype}{pad}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    household = next(h for h in load_households() if h.split == "unseen")
    manifest = render_corpus(work / "speech", [household], args.real_size_n, seed=300)
    n = log_corrected(work / "data", bundle, manifest)
    t0 = time.monotonic()
    household_json = str(household_file(household, work / "household.json"))
    report = run_night(work / "data", args, ["--context-file", household_json, "--dtype", dtype])
    return {
        "objective": objective,
        "dtype": dtype,
        "utterances": n,
        "status": report["status"],
        "reason": report.get("reason"),
        "wall_s": round(time.monotonic() - t0, 1),
        "duration_s": report.get("duration_s"),
        "peak_rss_mb": report.get("peak_rss_mb"),
        "peak_cuda_mb": report.get("peak_cuda_mb"),
        "stages": report.get("stages"),
        "train": {k: v for k, v in (report.get("train") or {}).items() if k not in ("history", "loss_curve")},
        "decoder": {
            k: v for k, v in (report.get("decoder") or {}).items() if k not in ("loss_curve", "changes")
        },
        "data": report.get("data"),
        "cascade_pad_30s": args.real_size_pad_30s,
    }


def bootstrap(args: argparse.Namespace) -> None:
    """Replay and general held-out speech of the base households, once (the layout the job expects)."""
    from wyoming_tinyalign.adapt import GENERAL_SEED, REPLAY_SEED, bootstrap_speech

    base = [h for h in load_households() if h.split == "base"]
    for name, n, seed in (("replay", args.replay_n, REPLAY_SEED), ("general", args.general_n, GENERAL_SEED)):
        bootstrap_speech(args.work / "bootstrap", name, n, seed, base)


def _fig(figures: dict, key: str) -> object:
    """A figure of a job's report for a table: '-' when the job had none."""
    value = figures.get(key)
    return "-" if value is None else value


def _pair(figures: dict | None) -> str:
    """Intent accuracy / WER on the held-out truth, or '-'."""
    return "-" if figures is None else f"{figures['intent_accuracy']:.3f} / {figures['wer']:.3f}"


def report(r: dict) -> str:
    labels = LABEL_MODES[r["labels"]].format(corrected=r.get("corrected"))
    lines = [
        f"Date {r['date']}; machine: {r['machine']}; job: `--threads {r['threads']}`, "
        f"`--budget-minutes {r['budget_minutes']}`; {r['labelled']} logged utterances per household, "
        f"labelled by {labels}; {r['heldout']} held-out; `--job-args '{r['job_args']}'`.",
        "",
        "| household | result | intent acc before -> after | intent error cut | WER before -> after "
        "| WER cut | the rejected candidate's intent acc / WER | cascade intent acc / WER "
        "| intent acc from the reference transcript "
        "| the job's held-out: intent acc, WER served -> candidate "
        "| general intent acc before -> after | job s | peak RSS MB |",
        "|---" * 13 + "|",
    ]
    for row in r["quality"]:
        b, a = row["before"]["aligned"], row["after"]["aligned"]
        cut = 1 - (1 - a["intent_accuracy"]) / max(1e-9, 1 - b["intent_accuracy"])
        wcut = 1 - a["wer"] / max(1e-9, b["wer"])
        c = row["before"]["cascade"]
        gb, ga = row["job"]["general_before"] or {}, row["job"]["general_after"] or {}
        hb, ha = row["job"]["household_before"] or {}, row["job"]["household_after"] or {}
        lines.append(
            f"| {row['household']} | {row['status']} "
            f"| {b['intent_accuracy']:.3f} -> {a['intent_accuracy']:.3f} | {cut:+.0%} "
            f"| {b['wer']:.3f} -> {a['wer']:.3f} | {wcut:+.0%} "
            f"| {_pair((row['rejected'] or {}).get('aligned'))} "
            f"| {c['intent_accuracy']:.3f} / {c['wer']:.3f} | {row['text_ceiling']:.3f} "
            f"| {_fig(hb, 'intent_accuracy')} -> {_fig(ha, 'intent_accuracy')}, "
            f"{_fig(hb, 'wer')} -> {_fig(ha, 'wer')} ({_fig(hb, 'n')} utterances) "
            f"| {_fig(gb, 'intent_accuracy')} -> {_fig(ga, 'intent_accuracy')} "
            f"| {row['job']['duration_s']} | {row['job']['peak_rss_mb']} |"
        )
    lines += [
        "",
        "What `--path auto` serves (day 0: the cascade), and the cascade with the night's decoder adapters:",
        "",
        "| household | served before: path, intent acc / WER | served after | intent error cut "
        "| cascade before -> after: intent acc / WER | the rejected adapters' cascade "
        "| decoder adapters: verdict (steps, epochs, s) |",
        "|---" * 7 + "|",
    ]
    for row in r["quality"]:
        served_before = row["before"]["cascade"]
        path = row.get("served_path", "aligned")
        served_after = row["after"].get(path) or row["after"]["aligned"]
        cut = 1 - (1 - served_after["intent_accuracy"]) / max(1e-9, 1 - served_before["intent_accuracy"])
        d = row.get("decoder") or {}
        lines.append(
            f"| {row['household']} | cascade, {_pair(served_before)} | {path}, {_pair(served_after)} "
            f"| {cut:+.0%} "
            f"| {_pair(row['before']['cascade'])} -> {_pair(row['after'].get('cascade'))} "
            f"| {_pair((row['rejected'] or {}).get('cascade'))} "
            f"| {d.get('reason') or ('not trained: ' + d['skipped'] if 'skipped' in d else '-')} "
            f"({d.get('steps')}, {d.get('epochs')}, {d.get('train_s')}) |"
        )
    if r.get("nights", 1) > 1:
        lines += [
            "",
            "| household | night | logged so far | labels | result | served after it "
            "| aligned intent acc / WER on the held-out | cascade (with its decoder adapters) "
            "| `--path auto` serves | the rejected candidate's aligned / cascade "
            "| other voices' intent acc: served -> candidate (shipped) |",
            "|---" * 11 + "|",
        ]
        for row in r["quality"]:
            b, c = row["before"]["aligned"], row["before"]["cascade"]
            lines.append(
                f"| {row['household']} | 0 | 0 | - | - | shipped "
                f"| {_pair(b)} | {_pair(c)} | cascade | - | - |"
            )
            for n in row["nights"]:
                a, job = n["after"]["aligned"], n["job"]
                gb, ga = job["general_before"] or {}, job["general_after"] or {}
                shipped = (job["general_shipped"] or {}).get("intent_accuracy")
                labels = (job["data"] or {}).get("labelled", "-")
                rejected = n["rejected"] or {}
                lines.append(
                    f"| {row['household']} | {n['night']} | {n['logged']} "
                    f"| {labels} | {n['status']}: {n['reason']} "
                    f"| {n['version']} | {_pair(a)} | {_pair(n['after'].get('cascade'))} "
                    f"| {n.get('served_path', '-')} "
                    f"| {_pair(rejected.get('aligned'))} / {_pair(rejected.get('cascade'))} "
                    f"| {_fig(gb, 'intent_accuracy')} -> {_fig(ga, 'intent_accuracy')}"
                    f"{f' ({shipped})' if shipped is not None else ''} |"
                )
    teacher = [row for row in r["quality"] if row["teacher_labels"]]
    if teacher:
        lines += [
            "",
            "| household | labelled by the teacher | their WER against the truth | exactly right |",
            "|---" * 4 + "|",
        ]
        for row in teacher:
            t = row["teacher_labels"]
            lines.append(
                f"| {row['household']} | {t['kept']} of {t['logged']} | {t['kept_wer']} | {t['kept_exact']} |"
            )
    if r["real_size"]:
        lines += [
            "",
            "| real-size job (whisper-base + Qwen2.5-0.5B shapes, random weights) | objective | utterances "
            "| result | wall s | job s | peak RSS MB | peak CUDA MB | train steps | step ms "
            "| decoder adapters: s, steps, epochs |",
            "|---" * 11 + "|",
        ]
        job_args = f" {r['job_args']}" if r["job_args"] else ""
        for s in r["real_size"]:
            d = s.get("decoder") or {}
            lines.append(
                f"| `adapt --now --threads {r['threads']} --dtype {s['dtype']}{job_args}` | {s['objective']} "
                f"| {s['utterances']} "
                f"| {s['status']} | {s['wall_s']} | {s['duration_s']} | {s['peak_rss_mb']} "
                f"| {s['peak_cuda_mb'] or '-'} | {s['train'].get('steps')} | {s['train'].get('step_ms')} "
                f"| {d.get('train_s')}, {d.get('steps')}, {d.get('epochs')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="a small dev bundle (dev-model --size small)"
    )
    parser.add_argument("--work", type=Path, required=True, help="folder for speech, data dirs and results")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="the night's time budget")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the job")
    parser.add_argument(
        "--labelled", type=int, default=100, help="logged utterances per household (per day, with --nights)"
    )
    parser.add_argument(
        "--nights", type=int, default=1,
        help="days in a row: each logs --labelled new utterances, then its night runs on all so far",
    )  # fmt: skip
    parser.add_argument(
        "--labels", choices=tuple(LABEL_MODES), default="corrections",
        help="every logged utterance corrected (default), none (the night's teacher labels alone), or "
        "`some`: --corrected of each day's, the teacher's for the rest",
    )  # fmt: skip
    parser.add_argument(
        "--corrected", type=int, default=25, help="with --labels some: corrected utterances per day"
    )
    parser.add_argument("--heldout", type=int, default=50, help="held-out utterances per household")
    parser.add_argument(
        "--households",
        type=lambda s: s.split(","),
        default=[h.name for h in load_households() if h.split == "unseen"],
        help="which unseen households, comma-separated (each keeps its seeds); with --one-voice a household "
        "stands for all its voices, and voices can be named too",
    )
    parser.add_argument(
        "--one-voice", action="store_true",
        help="each unseen household's voices one at a time, as households of one voice",
    )  # fmt: skip
    parser.add_argument("--real-size-n", type=int, default=200, help="utterances of the real-size run")
    parser.add_argument("--replay-n", type=int, default=400)
    parser.add_argument("--general-n", type=int, default=60)
    parser.add_argument(
        "--real-size-dtype", action="append", choices=("float32", "bfloat16"),
        help="backbone precision of the real-size run; give it twice to run both side by side "
        "(default float32)",
    )  # fmt: skip
    parser.add_argument(
        "--real-size-objective", choices=OBJECTIVES,
        help="the loss the real-size projector says it was aligned with, so its night's loss "
        "(default: the dev model's projector's)",
    )  # fmt: skip
    parser.add_argument("--job-args", default="", help="more `adapt` flags for every night (one string)")
    parser.add_argument(
        "--real-size-pad-30s", action="store_true",
        help="the real-size bundle's cascade pads to 30 s (as the real-backbone presets' does)",
    )  # fmt: skip
    parser.add_argument("--skip-real-size", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and budgets")
    args = parser.parse_args()
    if args.quick:
        args.labelled, args.heldout, args.households, args.real_size_n = 12, 6, args.households[:1], 16
        args.budget_minutes, args.replay_n, args.general_n = 1.0, 24, 12
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not (args.model / "bundle.json").is_file():
        raise SystemExit(
            f"{args.model} is not a bundle: build one with `wyoming-tinyalign dev-model --size small`"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    bootstrap(args)
    results: dict = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "model": str(args.model),
        "threads": args.threads,
        "budget_minutes": args.budget_minutes,
        "labelled": args.labelled,
        "nights": args.nights,
        "labels": args.labels,
        "corrected": args.corrected if args.labels == "some" else None,
        "job_args": args.job_args,
        "heldout": args.heldout,
        "one_voice": args.one_voice,
        "quick": args.quick,
    }
    results["quality"] = [] if args.skip_quality else quality(args)
    dtypes = [] if args.skip_real_size else args.real_size_dtype or ["float32"]
    results["real_size"] = [real_size(args, dtype) for dtype in dtypes]
    (args.work / "personalization.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
