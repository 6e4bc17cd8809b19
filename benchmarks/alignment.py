"""Alignment benchmark: the Tiny-Align paper's claims, measured side by side in one run.

    python benchmarks/alignment.py --model /tmp/small --work /tmp/bench-align [--budget-minutes 3]

`--model` is a small dev bundle (built there first if the folder has none). Prints markdown tables
(paste them into benchmarks/RESULTS.md) and writes every figure to WORK/alignment.json:

1. seconds per training step: EmbedLink vs generative vs generative+LoRA, at dev-model size and at
   real-size shapes (whisper-base encoder + Qwen2.5-0.5B LLM shapes, random weights);
2. training time to reach fixed validation intent accuracies at dev-model size;
3. BridgeFormer vs MLP vs linear, same data and time budget, with and without household context in the
   prompt (instruction injection), on the aligned and the readout paths, with a paired sign test over
   the held-out utterances on which two settings disagree (are they apart by more than chance?);
4. the cast length T and layer-count sweep behind the defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from realsize import speech_llm

from wyoming_tinyalign.adapt import bootstrap_speech
from wyoming_tinyalign.devmodel import build_dev_model
from wyoming_tinyalign.evaluate import score
from wyoming_tinyalign.gate import sign_test
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.manifest import load_utterances, read_manifest
from wyoming_tinyalign.model.speechllm import SpeechLLM
from wyoming_tinyalign.train import Example, TrainConfig, objective_loss, setup_projector, train, train_step

_LOGGER = logging.getLogger("alignment")
VARIANTS = {  # name -> (objective, LoRA rank)
    "EmbedLink": ("embedlink", 0),
    "generative": ("generative", 0),
    "generative+LoRA": ("generative", 8),
}


def corpus(work: Path, quick: bool) -> dict[str, Path]:
    """Train / validation / held-out speech of the base households (rendered once, then reused)."""
    households = [h for h in load_households() if h.split == "base"]
    sizes = {"train": (1200, 21), "val": (100, 22), "heldout": (200, 23)}
    if quick:
        sizes = {"train": (48, 21), "val": (12, 22), "heldout": (12, 23)}
    return {name: bootstrap_speech(work, name, n, seed, households) for name, (n, seed) in sizes.items()}


def step_seconds(model: SpeechLLM, examples: list[Example], objective: str, lora_r: int, steps: int) -> float:
    """Median seconds of one optimizer step (after one warm-up step), batch = len(examples)."""
    cfg = TrainConfig(objective=objective, lora_r=lora_r)
    projector, params = setup_projector(model, cfg)
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(model, projector, opt, params, objective_loss(objective), examples)
        if i:
            times.append(time.perf_counter() - t0)
    if lora_r:
        model.llm = model.llm.unload()  # take the adapters off again
    return statistics.median(times)


def section_step_times(dev: SpeechLLM, manifests: dict[str, Path], batch: int, quick: bool) -> list[dict]:
    households = {h.name: context_text(h) for h in load_households()}
    loaded = load_utterances(manifests["train"])
    rows = []
    # Real-size generative steps take tens of seconds on 2 cores: a smaller batch, fewer steps.
    for size, model, steps, n in (
        ("dev", dev, 10, batch),
        ("real", None, 1 if quick else 2, 2 if quick else 4),
    ):
        if model is None:
            _LOGGER.info("building real-size random backbones")
            model = speech_llm(dev)
        feats, lengths = model.encoder.encode([a for _, a in loaded[:n]])
        examples = [
            Example(f[: int(k)], u, households[u.household])
            for (u, _), f, k in zip(loaded[:n], feats, lengths, strict=True)
        ]
        row = {"size": size, "batch": n}
        for name, (objective, lora_r) in VARIANTS.items():
            row[name] = step_seconds(model, examples, objective, lora_r, steps)
            _LOGGER.info("%s %s: %.3f s/step", size, name, row[name])
        rows.append(row)
    return rows


def run_train(model_dir: Path, manifests: dict[str, Path], work: Path, name: str, cfg: TrainConfig) -> dict:
    result = train(
        model_dir, manifests["train"], manifests["val"], work / "runs" / name, cfg, cache_dir=work / "cache"
    )
    return {"history": result.history, "best": result.best, "steps": result.steps, "step_ms": result.step_ms}


def evaluate_bundle(bundle: Path, manifests: dict[str, Path]) -> dict:
    """Held-out intent accuracy and WER, aligned and readout paths, with and without context; and which
    utterances got the exact intent (for the paired tests)."""
    model = SpeechLLM.load(bundle)
    contexts = {h.name: context_text(h) for h in load_households()}
    loaded = load_utterances(manifests["heldout"])
    out = {}
    for path in ("aligned", "readout"):
        for ctx in (True, False):
            pairs = [(u, model.run(a, path, contexts[u.household] if ctx else "")) for u, a in loaded]
            r = score(pairs)
            hits = [u.intent is not None and u.intent.matches(res.intent) for u, res in pairs]
            out[f"{path}/{'context' if ctx else 'none'}"] = {
                "intent_accuracy": r["intent_accuracy"], "wer": r["wer"], "hits": hits,
            }  # fmt: skip
    return out


def paired(a: list[bool], b: list[bool]) -> str:
    """Utterances only `a` / only `b` got right, and the two-sided sign test's p-value."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = min(1.0, 2 * sign_test(max(only_a, only_b), min(only_a, only_b)))
    return f"{only_a} / {only_b} (p={p:.2f})"


def time_to(history: list[dict], accuracy: float) -> float | None:
    return next((h["train_s"] for h in history if h["intent_accuracy"] >= accuracy), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="small dev bundle (built if missing)")
    parser.add_argument("--work", type=Path, required=True, help="folder for speech, caches and runs")
    parser.add_argument("--budget-minutes", type=float, default=3.0, help="training budget per run")
    parser.add_argument(
        "--target-accuracy", type=float, nargs="+", default=[0.1, 0.2, 0.3],
        help="validation intent accuracies for time-to-quality",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny corpus, one real-size step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    if not (args.model / "bundle.json").is_file():
        build_dev_model(args.model, "small")
    args.work.mkdir(parents=True, exist_ok=True)
    manifests = corpus(args.work, args.quick)
    results: dict = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "train_utterances": len(read_manifest(manifests["train"])),
        "heldout_utterances": len(read_manifest(manifests["heldout"])),
        "budget_minutes": args.budget_minutes,
    }

    dev = SpeechLLM.load(args.model)
    results["step_seconds"] = section_step_times(dev, manifests, args.batch, args.quick)

    base = TrainConfig(max_minutes=args.budget_minutes, val_every_s=15, patience=1000, batch=args.batch)
    results["objectives"] = {}
    for name, (objective, lora_r) in VARIANTS.items():
        cfg = replace(base, objective=objective, lora_r=lora_r)
        run = run_train(args.model, manifests, args.work, f"objective-{objective}-{lora_r}", cfg)
        run["time_to_target_s"] = {str(t): time_to(run["history"], t) for t in args.target_accuracy}
        results["objectives"][name] = run

    results["projectors"] = {}
    for kind, stack in (("bridgeformer", 4), ("mlp", 5), ("linear", 5)):
        run = run_train(
            args.model, manifests, args.work, f"projector-{kind}", replace(base, projector=kind, stack=stack)
        )
        run["heldout"] = evaluate_bundle(args.work / "runs" / f"projector-{kind}", manifests)
        results["projectors"][kind] = run

    results["sweep"] = {}
    for cast_len, layers in ((12, 2), (32, 2), (24, 1), (24, 4)):
        name = f"T{cast_len}-L{layers}"
        run = run_train(
            args.model, manifests, args.work, f"sweep-{name}", replace(base, cast_len=cast_len, layers=layers)
        )
        run["heldout"] = evaluate_bundle(args.work / "runs" / f"sweep-{name}", manifests)
        results["sweep"][name] = run
    results["sweep"]["T24-L2"] = results["projectors"]["bridgeformer"]
    results["wall_minutes"] = round((time.monotonic() - started) / 60, 1)
    (args.work / "alignment.json").write_text(json.dumps(results, indent=2))
    print(report(results, args.target_accuracy))


def report(r: dict, targets: list[float]) -> str:
    """Markdown tables of the results."""
    lines = [
        f"Date {r['date']}; machine: {r['machine']}; budget {r['budget_minutes']} min per run; "
        f"{r['train_utterances']} training / {r['heldout_utterances']} held-out utterances.",
        "",
    ]
    lines += [
        "| s per step | batch | " + " | ".join(VARIANTS) + " | generative / EmbedLink | +LoRA / EmbedLink |"
    ]
    lines += ["|---" * 7 + "|"]
    for row in r["step_seconds"]:
        cells = " | ".join(f"{row[v]:.4f}" for v in VARIANTS)
        ratios = (
            f"{row['generative'] / row['EmbedLink']:.1f}x | {row['generative+LoRA'] / row['EmbedLink']:.1f}x"
        )
        lines.append(f"| {row['size']} size | {row['batch']} | {cells} | {ratios} |")
    to = " | ".join(f"train s to {t:.0%}" for t in targets)
    lines += [
        "",
        f"| objective (dev size) | steps | best val intent acc (at step) | {to} |",
        "|---" * (3 + len(targets)) + "|",
    ]
    for name, run in r["objectives"].items():
        best = run["best"]
        reached = " | ".join(
            "not reached" if (s := run["time_to_target_s"][str(t)]) is None else f"{s:.0f}" for t in targets
        )
        lines.append(
            f"| {name} | {run['steps']} | {best.get('intent_accuracy', 0):.3f} ({best.get('step', '-')}) "
            f"| {reached} |"
        )
    header = "| steps | path | intent acc (context) | intent acc (none) | WER (context) | WER (none) |"
    for title, runs in (("projector", r["projectors"]), ("BridgeFormer T-layers", r["sweep"])):
        lines += ["", f"| {title} {header}", "|---" * 7 + "|"]
        for name, run in runs.items():
            h = run["heldout"]
            for path in ("aligned", "readout"):
                c, n = h[f"{path}/context"], h[f"{path}/none"]
                acc = f"{c['intent_accuracy']:.3f} | {n['intent_accuracy']:.3f}"
                lines.append(
                    f"| {name} | {run['steps']} | {path} | {acc} | {c['wer']:.3f} | {n['wer']:.3f} |"
                )
    # Paired over the same held-out utterances: exact intents only one side got, and whether the
    # difference could be chance.
    aligned = {name: run["heldout"]["aligned/context"]["hits"] for name, run in r["projectors"].items()}
    lines += [
        "",
        "| aligned path, exact intents only A / only B got | A / B (two-sided sign test) |",
        "|---|---|",
    ]
    for a, b in (("bridgeformer", "mlp"), ("bridgeformer", "linear"), ("mlp", "linear")):
        lines.append(f"| A {a} vs B {b} (with context) | {paired(aligned[a], aligned[b])} |")
    for name, run in r["projectors"].items():
        without = run["heldout"]["aligned/none"]["hits"]
        lines.append(f"| {name}: A with context vs B without | {paired(aligned[name], without)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
