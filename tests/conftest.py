"""Shared fixtures: a micro dev model and a small synthetic corpus, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wyoming_tinyalign.devmodel import build_dev_model
from wyoming_tinyalign.households import load_households
from wyoming_tinyalign.store import InteractionStore
from wyoming_tinyalign.synth import render_corpus

# Tiny models gain nothing from more threads, and a test process shares the CPU with the servers it
# starts: oversubscribed torch threads run several times slower.
torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InteractionStore]:
    """An open interaction log in a fresh folder."""
    s = InteractionStore(tmp_path / "log")
    s.open()
    yield s
    s.close()


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro dev bundle (tokenizer, tiny LLM, tiny Whisper, untrained projector)."""
    out = tmp_path_factory.mktemp("micro-model")
    build_dev_model(out, "micro", seed=0)
    return out


@pytest.fixture(scope="session")
def base_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few utterances of the base households."""
    households = [h for h in load_households() if h.split == "base"]
    return render_corpus(tmp_path_factory.mktemp("speech"), households, 6, seed=7)
