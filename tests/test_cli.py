"""The command line as a user runs it: `eval` JSON for every path, flags from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from wyoming_tinyalign.__main__ import build_parser
from wyoming_tinyalign.adapt import AdaptOptions, options_from_args

EVAL_KEYS = {"n", "wer", "intent_accuracy", "intent_name_accuracy", "latency_ms_p50", "latency_ms_p95"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wyoming_tinyalign", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "answered_on"),
    [("aligned", "aligned"), ("readout", "readout"), ("cascade", "cascade"), (None, "cascade")],
    ids=["aligned", "readout", "cascade", "default"],
)
def test_eval_prints_one_json_object(
    micro_model: Path, base_manifest: Path, path: str | None, answered_on: str
) -> None:
    """Each path, and by default (`--path auto`) the one `serve` answers on: a bundle's own projector
    does not replace the cascade until a household version's aligned path beats it."""
    chosen = ["--path", path] if path else []
    proc = cli("eval", "--model", str(micro_model), "--manifest", str(base_manifest), *chosen, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report.keys() >= EVAL_KEYS
    assert report["n"] == 6 and report["path"] == answered_on
    assert 0.0 <= report["intent_accuracy"] <= report["intent_name_accuracy"] <= 1.0
    assert report["wer"] >= 0.0
    assert 0 < report["latency_ms_p50"] <= report["latency_ms_p95"]


def test_eval_on_a_missing_model_fails_clearly(base_manifest: Path, tmp_path: Path) -> None:
    proc = cli("eval", "--model", str(tmp_path), "--manifest", str(base_manifest), "--json")
    assert proc.returncode != 0
    assert "bundle.json" in proc.stderr


def test_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WYOMING_TINYALIGN_DATA_DIR", "/srv/tinyalign")
    monkeypatch.setenv("WYOMING_TINYALIGN_DEBUG", "true")
    args = build_parser().parse_args(["serve"])
    assert str(args.data_dir) == "/srv/tinyalign" and args.debug is True
    # The command line wins over the environment.
    args = build_parser().parse_args(["serve", "--data-dir", "/tmp/x"])
    assert str(args.data_dir) == "/tmp/x"


@pytest.mark.parametrize(
    ("command", "given", "expected"),
    [("adapt", None, "1000"), ("adapt", "30000", "30000"), ("serve", None, None), ("eval", None, None)],
)
def test_only_the_nightly_jobs_openmp_threads_stop_spinning_soon(
    command: str, given: str | None, expected: str | None
) -> None:
    """`adapt` sets `GOMP_SPINCOUNT` (unless the user did) before torch loads, which is when OpenMP reads
    it: the package itself must not load torch. The server's answers keep OpenMP's default."""
    code = (
        "import sys; sys.argv = ['wyoming-tinyalign', sys.argv[1]]; import wyoming_tinyalign; "
        "early = 'torch' in sys.modules; import wyoming_tinyalign.__main__, os; "
        "print(early, os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run(
        [sys.executable, "-c", code, command], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", str(expected)]


def test_min_confidence_is_a_log_probability_or_off(capsys: pytest.CaptureFixture[str]) -> None:
    def parsed(*flag: str) -> float | None:
        return build_parser().parse_args(["serve", "--data-dir", "/tmp/x", *flag]).min_confidence

    assert parsed() == -0.15 and parsed("--min-confidence", "-0.3") == -0.3
    assert parsed("--min-confidence", "off") is None and parsed("--min-confidence", "OFF") is None
    for bad in ("0.5", "nan", "sure"):
        with pytest.raises(SystemExit):
            parsed("--min-confidence", bad)
        assert "--min-confidence" in capsys.readouterr().err


def test_every_adapt_flag_reaches_the_nights_options() -> None:
    """`adapt --decoder-epochs` and `--decoder-lr` were read and then dropped (the job's options were
    copied from the flags one by one): every option but `teacher_max` comes from a flag of its name."""
    args = build_parser().parse_args(
        ["adapt", "--data-dir", "/tmp/x", "--decoder-epochs", "7", "--decoder-lr", "0.5",
         "--outcome-window", "90", "--device", "cuda", "--tolerance", "0.3"]
    )  # fmt: skip
    opts = options_from_args(args)
    assert (opts.decoder_epochs, opts.decoder_lr, opts.outcome_window_s) == (7, 0.5, 90.0)
    assert (opts.device, opts.tolerance, str(opts.data_dir)) == ("cuda", 0.3, "/tmp/x")
    flagged = set(vars(args)) | {"outcome_window_s"}
    assert {f.name for f in fields(AdaptOptions)} - flagged == {"teacher_max"}
