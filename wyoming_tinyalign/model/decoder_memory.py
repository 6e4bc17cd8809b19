"""The household's corrected words remembered by Whisper's decoder: a nearest-neighbour memory (kNN-LM).

At night each corrected utterance the decoder adapters learn from is read once more through the decoder
with them (teacher-forced on its corrected transcript, `decoder_train.remember`), and at each step the
decoder's last hidden state is kept with the token that came next. When the cascade decodes, each
step's hidden state looks up its `NEIGHBOURS` nearest kept states; their tokens, weighted by a softmax
over minus their squared distances (in units of `TEMPERATURE` times the keys' mean squared norm), give a
second distribution over the vocabulary, mixed into Whisper's own:

    p = (1 - weight) * p_whisper + weight * p_memory

A household voice saying the household's words again leaves states near those its corrections left, so
the words come back where Whisper alone writes others. Nothing is trained: a night's memory of 100
corrections is about 750 states, built in seconds. `WEIGHT` is the kNN-LM paper's (Khandelwal et al.,
2020); the figures on the demo model, the weight's included: `benchmarks/RESULTS.md`, "A memory of the
household's corrections on Whisper's decoder".

The memory travels with the night's decoder adapters: its tensors sit in the adapters' dict (and so in
the version file, under `decoder.`), which `install` leaves to `DecoderMemory.of`. Its values are the
household's words (as token ids), so each state also names the clip it came from (`FeatureCache.key`):
deleting a recording takes its states out of every version's memory and out of the served one
(`versions.Versions.forget_memory`, `adapt.NightData.forget`).

Every correction is remembered, also those a night holds out to judge its adapters (`judges`): once the
adapters are kept, the household's every correction should stick. A night judges what is served without
those clips' states (`judged`), as its candidate was built without them, so the gate stays fair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decoder_adapter import MEMORY_PREFIX, Adapter, AdapterError

# Its tensors among a version's adapters: the states, the tokens, which clip each state came from (an index
# into CLIPS), the clips' keys (their sha256 digests, 32 bytes each) and which clips judge nights (1/0).
KEYS, VALUES, OWNERS, CLIPS, JUDGES = (
    MEMORY_PREFIX + name for name in ("keys", "values", "owners", "clips", "judges")
)
WEIGHT = 0.25  # of the memory's distribution in the mix
NEIGHBOURS = 8  # kept states looked up per step
TEMPERATURE = 0.1  # of the distances, per mean squared norm of the keys


@dataclass
class DecoderMemory:
    """Decoder states `keys` [N, D], the token that followed each, `values` [N], and the clip each came
    from, `clips[owners[i]]` (a clip's `FeatureCache.key`); `judges`: those of the clips held out to
    judge nights."""

    keys: torch.Tensor
    values: torch.Tensor
    owners: torch.Tensor
    clips: list[str]
    judges: frozenset[str] = frozenset()
    weight: float = WEIGHT
    _keys: torch.Tensor = field(init=False, repr=False)  # float32, for the distances, on the decoder's device
    _values: torch.Tensor = field(init=False, repr=False)  # (on the decoder's device)
    _scale: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.values)
        if self.keys.dim() != 2 or self.keys.shape[0] != n or self.owners.shape != (n,) or not n:
            raise AdapterError(
                f"a memory needs keys [N, D], values [N] and owners [N], not {tuple(self.keys.shape)}, "
                f"{tuple(self.values.shape)} and {tuple(self.owners.shape)}"
            )
        if int(self.owners.min()) < 0 or int(self.owners.max()) >= len(self.clips):
            raise AdapterError(f"a memory's states name clips beyond its {len(self.clips)}")
        if not self.judges <= set(self.clips):
            raise AdapterError("a memory's judging clips must be among its clips")
        self._keys, self._values = self.keys.float(), self.values
        self._scale = float(self._keys.pow(2).sum(-1).mean()) or 1.0

    @classmethod
    def of(cls, adapter: Adapter | None) -> DecoderMemory | None:
        """The memory among `adapter`'s tensors (None: it holds none)."""
        if adapter is None or KEYS not in adapter:
            return None
        if not {VALUES, OWNERS, CLIPS} <= set(adapter):
            raise AdapterError("some of a memory's tensors are missing")
        clips = memory_clips(adapter)
        flags = adapter[JUDGES].tolist() if JUDGES in adapter else [0] * len(clips)  # (older versions: none)
        if len(flags) != len(clips):
            raise AdapterError(f"a memory of {len(clips)} clips says which judge of {len(flags)}")
        judges = frozenset(key for key, flag in zip(clips, flags, strict=True) if flag)
        return cls(adapter[KEYS], adapter[VALUES].long(), adapter[OWNERS].long(), clips, judges)

    def tensors(self) -> Adapter:
        """The memory as tensors to store with the adapters (keys in half precision)."""
        clips = torch.tensor([list(bytes.fromhex(key)) for key in self.clips], dtype=torch.uint8)
        return {
            KEYS: self.keys.half().contiguous(),
            VALUES: self.values.long().contiguous(),
            OWNERS: self.owners.long().contiguous(),
            CLIPS: clips,
            JUDGES: torch.tensor([key in self.judges for key in self.clips], dtype=torch.uint8),
        }

    def holds(self, clips: set[str]) -> bool:
        """Whether any state came from one of these clips."""
        return not clips.isdisjoint(self.clips)

    def without(self, clips: set[str]) -> DecoderMemory | None:
        """The memory without the states of these clips (None: nothing is left)."""
        kept_clips = [key for key in self.clips if key not in clips]
        position = {key: i for i, key in enumerate(kept_clips)}
        owners = torch.tensor([position.get(key, -1) for key in self.clips], dtype=torch.long)[self.owners]
        kept = owners >= 0
        if not bool(kept.any()):
            return None
        return DecoderMemory(
            self.keys[kept], self.values[kept], owners[kept], kept_clips, self.judges - clips, self.weight
        )

    def judged(self) -> DecoderMemory | None:
        """The memory as a night judges it: without the states of the clips held out to judge nights
        (None: nothing is left)."""
        return self.without(set(self.judges)) if self.judges else self

    def mix(self, logprobs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """One step's log-probabilities over the vocabulary with the memory mixed in, for the decoder's
        last hidden state `hidden` [D] at that step."""
        if self._keys.device != hidden.device:  # (moved once)
            self._keys, self._values = self._keys.to(hidden.device), self._values.to(hidden.device)
        distances = (self._keys - hidden.float()).pow(2).sum(-1)
        near = torch.topk(-distances, min(NEIGHBOURS, len(distances)))
        weights = torch.softmax(near.values / (TEMPERATURE * self._scale), -1)
        remembered = torch.zeros_like(logprobs).index_add_(
            0, self._values[near.indices], weights.to(logprobs.dtype)
        )
        return torch.log((1 - self.weight) * logprobs.exp() + self.weight * remembered)


def memory_clips(adapter: Adapter) -> list[str]:
    """The keys of the clips a memory among `adapter`'s tensors came from (read from `CLIPS` alone: none
    when it holds no memory)."""
    return [bytes(row.tolist()).hex() for row in adapter[CLIPS].to(torch.uint8)] if CLIPS in adapter else []


def as_judged(adapter: Adapter) -> Adapter:
    """`adapter` with its memory as a night judges it (`DecoderMemory.judged`): how a night serves a
    version's adapters, and what their cached answers are keyed by."""
    memory = DecoderMemory.of(adapter)
    return with_memory(adapter, memory.judged() if memory is not None else None)


def with_memory(adapter: Adapter, memory: DecoderMemory | None) -> Adapter:
    """`adapter`'s own weights with `memory` (None: with no memory)."""
    own = {k: v for k, v in adapter.items() if not k.startswith(MEMORY_PREFIX)}
    return own | memory.tensors() if memory is not None else own
