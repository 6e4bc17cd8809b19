"""A training loop's state, saved whole so that a loop stopped part-way (a restart, a power cut) goes on.

One safetensors file, no pickle: what the loop trains (each module's trainable parameters only: a frozen
LLM under LoRA is not copied), its optimizer's moments, torch's random generator and, when the loop draws
from one, a Python `random.Random`, plus the loop's own position as JSON (`state`). It is written by
`write_atomic`: a kill at any moment leaves the last save or the one before it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .files import write_atomic

_LOGGER = logging.getLogger(__name__)

Part = nn.Module | torch.optim.Optimizer
TORCH_RNG = "rng.torch"


@dataclass
class Saved:
    """A save read whole: the loop's position and the tensors of its parts."""

    state: dict
    tensors: dict[str, torch.Tensor]
    rng: list | None  # the Python generator's `getstate()`, as JSON keeps it (None: the loop has none)


class Checkpoint:
    """Saves and restores `parts` (named modules and optimizers) and the random generators in `path`.

    `save` writes at most every `every_s` seconds (0: at each call). `read` checks a save against the
    parts before `restore` touches any of them, so a save of other parts, or a torn one, is refused whole.
    """

    def __init__(
        self,
        path: Path | None,
        parts: dict[str, Part],
        rng: random.Random | None = None,
        every_s: float = 0.0,
    ) -> None:
        self.path, self.parts, self.rng, self.every_s = path, parts, rng, every_s
        self.last = time.monotonic()

    def _tensors(self) -> dict[str, torch.Tensor]:
        """What is saved, where the parts hold it: trainable parameters, optimizer moments, torch's
        generator."""
        out = {TORCH_RNG: torch.get_rng_state()}
        for name, part in self.parts.items():
            if isinstance(part, torch.optim.Optimizer):
                for i, moments in part.state_dict()["state"].items():
                    out |= {f"{name}.{i}.{k}": torch.as_tensor(v) for k, v in moments.items()}
            else:
                out |= {f"{name}.{k}": p for k, p in part.named_parameters() if p.requires_grad}
        return out

    def save(self, state: dict) -> None:
        """Save the parts with the loop's `state` (JSON), unless the last save is under `every_s` old."""
        if self.path is None or time.monotonic() - self.last < self.every_s:
            return
        meta = {"state": json.dumps(state)}
        if self.rng is not None:
            meta["rng"] = json.dumps(self.rng.getstate())
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors().items()}
        write_atomic(self.path, save(tensors, metadata=meta))
        self.last = time.monotonic()

    def read(self) -> Saved | None:
        """The save in `path`, read whole; None when there is none, or it cannot be read or does not fit
        the parts (a torn file, another model's: the loop then starts from its beginning, said in the log)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            rng = json.loads(meta["rng"]) if self.rng is not None else None
            saved = Saved(json.loads(meta["state"]), tensors, rng)
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            _LOGGER.warning("%s cannot be read (%s): starting from the beginning", self.path, err)
            return None
        expected = {k: v.shape for k, v in self._tensors().items() if not self._is_moment(k)}
        found = {k: v.shape for k, v in tensors.items() if not self._is_moment(k)}
        if found != expected:
            differ = sorted(set(found.items()) ^ set(expected.items()))[:3]
            _LOGGER.warning(
                "%s does not fit this training (%s ...): starting from the beginning", self.path, differ
            )
            return None
        return saved

    def _is_moment(self, key: str) -> bool:
        """An optimizer's moment: a fresh optimizer has none to compare a save's with (the parameters'
        names and shapes, which they follow, are compared)."""
        return isinstance(self.parts.get(key.split(".", 1)[0]), torch.optim.Optimizer)

    def restore(self, saved: Saved) -> None:
        """Put a save that `read` returned back into the parts and the generators."""
        tensors = saved.tensors
        for name, part in self.parts.items():
            prefix = f"{name}."
            if isinstance(part, torch.optim.Optimizer):
                opt_state = part.state_dict()
                for key, value in tensors.items():
                    if key.startswith(prefix):
                        i, moment = key[len(prefix) :].split(".", 1)
                        opt_state["state"].setdefault(int(i), {})[moment] = value
                part.load_state_dict(opt_state)
                continue
            params = dict(part.named_parameters())
            with torch.no_grad():
                for key, value in tensors.items():
                    if key.startswith(prefix):
                        params[key[len(prefix) :]].copy_(value)
        torch.set_rng_state(tensors[TORCH_RNG])
        if self.rng is not None:
            version, internal, gauss = saved.rng
            self.rng.setstate((version, tuple(internal), gauss))
