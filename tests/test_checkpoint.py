"""A training loop's save (`checkpoint.Checkpoint`): what it keeps, and what it refuses before touching."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from wyoming_tinyalign.checkpoint import Checkpoint


def _loop(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)  # frozen, as an LLM under LoRA
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)


def _step(model: nn.Module, opt: torch.optim.Optimizer, rng: random.Random) -> None:
    x = torch.randn(3, 4) * rng.random()  # draws from both generators, as a training step does
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_loop_restored_from_its_save_goes_on_as_if_never_stopped(tmp_path: Path) -> None:
    """Trainable parameters, optimizer moments and both generators come back; frozen weights are not
    copied into the file."""
    whole_model, whole_opt = _loop(0)
    rng = random.Random(1)
    for _ in range(6):
        _step(whole_model, whole_opt, rng)

    model, opt = _loop(0)
    rng = random.Random(1)
    saves = Checkpoint(tmp_path / "s.safetensors", {"model": model, "opt": opt}, rng)
    for step in range(1, 4):
        _step(model, opt, rng)
        saves.save({"step": step})
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["state"]) == {"step": 3}
        assert not any(k.startswith("model.0.") for k in f.keys())  # noqa: SIM118
        assert {"model.1.weight", "model.1.bias", "opt.0.exp_avg", "rng.torch"} <= set(f.keys())  # noqa: SIM118

    torch.manual_seed(99)  # another process: other generators, fresh parts
    model, opt = _loop(0)
    rng = random.Random(7)
    saves = Checkpoint(tmp_path / "s.safetensors", {"model": model, "opt": opt}, rng)
    saved = saves.read()
    assert saved is not None and saved.state == {"step": 3}
    saves.restore(saved)
    for _ in range(3):
        _step(model, opt, rng)
    assert all(torch.equal(a, b) for a, b in zip(whole_model.parameters(), model.parameters(), strict=True))


def test_a_save_is_written_at_most_every_every_s(tmp_path: Path) -> None:
    model, opt = _loop(0)
    saves = Checkpoint(tmp_path / "s.safetensors", {"model": model, "opt": opt}, every_s=3600)
    saves.save({"step": 1})
    assert not saves.path.exists()
    Checkpoint(None, {"model": model}).save({"step": 1})  # no path (a training that is not saved)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["torn", "another model", "no generator"])
def test_a_save_that_does_not_fit_is_refused_before_any_part_is_touched(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.safetensors"
    model, opt = _loop(0)
    if how == "torn":
        Checkpoint(path, {"model": model, "opt": opt}, random.Random(0)).save({"step": 5})
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "another model":
        Checkpoint(path, {"model": nn.Linear(8, 3)}, random.Random(0)).save({"step": 5})
    else:  # saved by a loop without a Python generator, read by one with
        Checkpoint(path, {"model": model, "opt": opt}).save({"step": 5})
    before = [p.clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING):
        assert Checkpoint(path, {"model": model, "opt": opt}, random.Random(0)).read() is None
    assert "starting from the beginning" in caplog.text and str(path) in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
