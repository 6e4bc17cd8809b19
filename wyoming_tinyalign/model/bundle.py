"""A model bundle folder: which backbones, which projector, which prompt.

    bundle/
      bundle.json            backbone ids (hub ids or folders relative to the bundle), prompt, metadata
      projector.safetensors  the trained projector; its header holds its config, the encoder and LLM ids
                             it was aligned to, the training data hash and metrics (self-describing);
                             a household version may also hold adapters for Whisper's decoder
                             (tensors under `decoder.`, their shape in the header: `decoder_adapter.py`)
      whisper/, llm/         only for locally built models (e.g. the offline dev model)

Weights are safetensors only; models are never loaded with `trust_remote_code`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..files import write_atomic
from .decoder_adapter import PREFIX, Adapter, AdapterConfig, ShapedAdapter
from .projector import Projector, ProjectorConfig, build_projector

BUNDLE_FILE = "bundle.json"
PROJECTOR_FILE = "projector.safetensors"
FORMAT = 1


class BundleError(Exception):
    """A bundle or projector checkpoint that cannot be used, with the reason."""


@dataclass
class BundleConfig:
    """Contents of `bundle.json`."""

    encoder: str
    llm: str
    prompt_template: str
    projector: str | None = PROJECTOR_FILE
    lora: str | None = None  # folder of LoRA adapters for the LLM, trained with the projector
    cascade_pad_30s: bool = False  # real Whisper decodes best on 30 s padded input
    metadata: dict = field(default_factory=dict)
    format: int = FORMAT


@dataclass
class ProjectorInfo:
    """What a projector checkpoint says about itself."""

    config: ProjectorConfig
    encoder: str
    llm: str
    data_hash: str = ""
    trained: bool = False
    metrics: dict = field(default_factory=dict)
    # The loss it was aligned with (`train.OBJECTIVES`): a night fine-tunes it with the same one.
    objective: str = "embedlink"
    embedlink_weight: float = 1.0  # of the EmbedLink term of the combined objective
    decoder: AdapterConfig | None = None  # the shape of the Whisper decoder adapters the file holds


def save_bundle_config(folder: Path, cfg: BundleConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / BUNDLE_FILE, json.dumps(asdict(cfg), indent=2).encode())


def load_bundle_config(folder: Path) -> BundleConfig:
    path = Path(folder) / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{folder} is not a model bundle: {BUNDLE_FILE} is missing")
    try:
        data = json.loads(path.read_text())
        cfg = BundleConfig(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise BundleError(f"{path} is not a valid bundle file: {err}") from err
    if cfg.format != FORMAT:
        raise BundleError(f"{path} has format {cfg.format}; this version reads format {FORMAT}")
    return cfg


def save_projector(
    path: Path, projector: Projector, info: ProjectorInfo, adapter: Adapter | None = None
) -> None:
    """Save weights (and Whisper decoder adapters, of `info.decoder`) and self-description in one
    safetensors file, atomically."""
    if (adapter is None) != (info.decoder is None):
        raise ValueError("decoder adapters are saved with their shape (info.decoder), and only then")
    meta = {
        "config": json.dumps(info.config.to_dict()),
        "encoder": info.encoder,
        "llm": info.llm,
        "data_hash": info.data_hash,
        "trained": json.dumps(info.trained),
        "metrics": json.dumps(info.metrics),
        "objective": info.objective,
        "embedlink_weight": json.dumps(info.embedlink_weight),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    if adapter is not None and info.decoder is not None:
        meta["decoder"] = json.dumps(info.decoder.to_dict())
        tensors |= {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    write_atomic(Path(path), save(tensors, metadata=meta))


def read_projector_info(path: Path) -> ProjectorInfo:
    """A projector checkpoint's self-description, from its header alone (the weights are not read)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"projector weights {path} are missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"projector weights {path} are corrupt or truncated ({err})") from err
    try:
        return ProjectorInfo(
            config=ProjectorConfig(**json.loads(meta["config"])),
            encoder=meta["encoder"],
            llm=meta["llm"],
            data_hash=meta.get("data_hash", ""),
            trained=json.loads(meta.get("trained", "false")),
            metrics=json.loads(meta.get("metrics", "{}")),
            objective=meta.get("objective", "embedlink"),
            embedlink_weight=float(json.loads(meta.get("embedlink_weight", "1.0"))),
            decoder=AdapterConfig(**json.loads(meta["decoder"])) if "decoder" in meta else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"projector weights {path} have no valid self-description ({err})") from err


def load_projector(path: Path, device: str | torch.device = "cpu") -> tuple[Projector, ProjectorInfo]:
    """Load a projector checkpoint; a corrupt, truncated or mismatched file raises `BundleError`."""
    info = read_projector_info(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"projector weights {path} are corrupt or truncated ({err})") from err
    projector = build_projector(info.config)
    try:
        projector.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(PREFIX)}, strict=True)
    except RuntimeError as err:
        raise BundleError(f"projector weights {path} do not fit their config: {err}") from err
    return projector.to(device).eval(), info


def load_decoder_adapter(path: Path, only: Collection[str] | None = None) -> ShapedAdapter | None:
    """The Whisper decoder adapters a version file holds, with their shape (None: it holds none); with
    `only`, only those of their tensors (the others are not read)."""
    info = read_projector_info(path)
    if info.decoder is None:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            names = [k[len(PREFIX) :] for k in f.keys() if k.startswith(PREFIX)]  # noqa: SIM118
            adapter = {k: f.get_tensor(PREFIX + k) for k in names if only is None or k in only}
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"decoder adapters in {path} are corrupt or truncated ({err})") from err
    if not names:
        raise BundleError(f"{path} says it holds decoder adapters, but has none")
    return adapter, info.decoder
