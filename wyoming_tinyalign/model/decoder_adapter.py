"""Household adapters on Whisper's decoder: the words a family uses (its names), learnt at night.

Whisper's decoder writes the cascade's transcript (and the night's teacher labels). A night may train
small low-rank adapters (LoRA, through `peft`) on its self-attention, its cross-attention's query and
output, and its MLP layers, from the household's corrected transcripts. The encoder is never touched, so
the projector and the feature cache see the same features with or without adapters; the cross-attention's
keys and values (over up to 1500 encoder frames) are left alone, so a training step never differentiates
through them.

The adapters travel in the night's version file beside the projector (`bundle.save_projector`, tensors
named `decoder.<module>.lora_A.weight`); the server puts them into its Whisper between requests
(`install`), and `install(whisper, None)` turns them off again (a rollback to a version without). A
night's adapters may hold a memory of the household's corrections too (`decoder_memory.py`: tensors
named `memory.*`), which `install` leaves alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

PREFIX = "decoder."  # of the adapters' tensors in a version file
MEMORY_PREFIX = "memory."  # of a memory's tensors among them (`decoder_memory.py`)
_LAYER = r".*decoder\.layers\.\d+\."
TARGETS = rf"{_LAYER}(self_attn\.(q_proj|k_proj|v_proj|out_proj)|encoder_attn\.(q_proj|out_proj)|fc1|fc2)"
_NAME = "default"  # peft's adapter name, left out of the stored tensors' names

Adapter = dict[str, torch.Tensor]  # tensor name (without PREFIX) -> weights


@dataclass(frozen=True)
class AdapterConfig:
    """The adapters' shape: stored in a version's header, and checked when a Whisper takes them."""

    rank: int = 16
    alpha: int = 32
    targets: str = TARGETS

    def to_dict(self) -> dict:
        return asdict(self)


ShapedAdapter = tuple[Adapter, AdapterConfig]  # adapters with their shape, as a version holds them


class AdapterError(ValueError):
    """Adapters that do not fit this Whisper (another shape, or tensors missing)."""


def attach(whisper: nn.Module, config: AdapterConfig) -> None:
    """Give `whisper`'s decoder empty adapters of `config` (they change nothing until trained or
    installed); a Whisper that has adapters keeps them, and one with another shape is refused."""
    found = getattr(whisper, "tinyalign_adapter", None)
    if found == config:
        return
    if found is not None:
        raise AdapterError(f"this Whisper has adapters of {found}, not {config}")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=config.targets)
    inject_adapter_in_model(lora, whisper, adapter_name=_NAME)
    whisper.tinyalign_adapter = config
    for param in whisper.parameters():  # serving trains nothing (`train_decoder_adapter` turns them on)
        param.requires_grad_(False)


def _layers(whisper: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in whisper.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(whisper: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by stored name (`...q_proj.lora_A.weight`)."""
    return {
        name.replace(f".{_NAME}.", "."): param
        for name, param in whisper.named_parameters()
        if ".lora_" in name
    }


def extract(whisper: nn.Module) -> Adapter:
    """A copy of the adapters' weights (on the CPU, float32), to store."""
    return {k: p.detach().to("cpu", torch.float32).clone() for k, p in adapter_parameters(whisper).items()}


def fresh(whisper: nn.Module, config: AdapterConfig, seed: int) -> Adapter:
    """New adapters of `config` for `whisper`, initialised as peft does (A Kaiming-uniform, B zero: the
    decoder as built) but drawn from `seed`, so that a night trains the same adapters every time."""
    attach(whisper, config)
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, param in sorted(adapter_parameters(whisper).items()):
        weights = torch.zeros(param.shape)
        if ".lora_A." in name:
            nn.init.kaiming_uniform_(weights, a=math.sqrt(5), generator=generator)
        adapter[name] = weights
    return adapter


def install(whisper: nn.Module, adapter: Adapter | None, config: AdapterConfig | None = None) -> None:
    """Serve `adapter` (of `config`) in `whisper`'s decoder, or none (`None`: Whisper as it was built).
    Checked whole before any weight changes; a memory among its tensors is not the decoder's."""
    if adapter is None:
        for layer in _layers(whisper):
            layer.enable_adapters(False)
        return
    adapter = {k: v for k, v in adapter.items() if not k.startswith(MEMORY_PREFIX)}
    attach(whisper, config or AdapterConfig())
    params = adapter_parameters(whisper)
    if set(adapter) != set(params):
        missing = sorted(set(params) ^ set(adapter))[:2]
        raise AdapterError(f"the adapters do not fit this Whisper's decoder (e.g. {missing})")
    for key, value in adapter.items():
        if value.shape != params[key].shape:
            raise AdapterError(f"{key} is {tuple(value.shape)}, the decoder needs {tuple(params[key].shape)}")
    with torch.no_grad():
        for key, value in adapter.items():
            params[key].copy_(value)
    for layer in _layers(whisper):
        layer.enable_adapters(True)  # (peft marks them trainable: serving trains nothing)
    for param in params.values():
        param.requires_grad_(False)


def adapter_key(adapter: Adapter) -> str:
    """A digest of adapters' weights (what a night's answers with them are cached under)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(adapter.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
