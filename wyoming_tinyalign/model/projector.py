"""Projectors from encoder features to LLM input embeddings.

- `BridgeFormer` (Tiny-Align): stack frames -> input MLP -> transformer encoder layers with *no*
  positional encoding (the encoder features already carry time) -> adaptive pooling to a fixed cast
  length `T` -> output MLP.
- `MLPProjector` (SLAM-ASR / Ultravox style): stack `k` frames -> 2-layer MLP; output length ~ N/k.
- `LinearProjector`: stack `k` frames -> one linear layer.

Every projector ends in a LayerNorm times `embed_norm / sqrt(D)`, so that its outputs have the norm of
the LLM's embedding rows (an unscaled projector makes MSE a vanishing part of the EmbedLink loss).
All take `(features [B, N, Da], lengths [B])` and return `(embeddings [B, M, D], lengths [B])`;
padded positions never change the valid ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

KINDS = ("bridgeformer", "mlp", "linear")


@dataclass
class ProjectorConfig:
    """Everything needed to rebuild a projector (stored with its weights)."""

    kind: str
    input_dim: int
    output_dim: int
    embed_norm: float
    stack: int = 4
    hidden_dim: int = 256
    cast_len: int = 24
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projector kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """`[B, size]` bool, True on valid positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def stack_frames(x: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every `k` consecutive frames: `[B, N, D]` -> `[B, ceil(N/k), k*D]`."""
    b, n, d = x.shape
    x = x * lengths_mask(lengths, n).unsqueeze(-1).to(x.dtype)
    pad = (-n) % k
    if pad:
        x = nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(b, (n + pad) // k, k * d), (lengths + k - 1) // k


def adaptive_pool(x: torch.Tensor, lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Average each item's valid frames into `size` bins (bin t covers [floor(tL/T), ceil((t+1)L/T)))."""
    t = torch.arange(size, device=x.device, dtype=torch.float64)
    length = lengths.to(torch.float64)[:, None]
    start = torch.floor(t * length / size)
    end = torch.maximum(torch.ceil((t + 1) * length / size), start + 1)
    pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)
    weights = ((pos >= start[..., None]) & (pos < end[..., None])).to(x.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ x


class _ScaledOutput(nn.Module):
    """LayerNorm whose output rows have the LLM embedding rows' typical norm."""

    def __init__(self, dim: int, embed_norm: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scale = embed_norm / math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


class BridgeFormer(nn.Module):
    """Tiny-Align's projector; output length is always `cast_len`."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.input_mlp = nn.Sequential(nn.Linear(cfg.stack * cfg.input_dim, h), nn.GELU(), nn.Linear(h, h))
        layer = nn.TransformerEncoderLayer(
            h, cfg.heads, 4 * h, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.output_mlp = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, cfg.output_dim))
        self.out = _ScaledOutput(cfg.output_dim, cfg.embed_norm)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = stack_frames(feats, lengths, self.cfg.stack)
        x = self.input_mlp(x)
        x = self.layers(x, src_key_padding_mask=~lengths_mask(lengths, x.shape[1]))
        x = adaptive_pool(x, lengths, self.cfg.cast_len)
        out_lengths = torch.full_like(lengths, self.cfg.cast_len)
        return self.out(self.output_mlp(x)), out_lengths


class MLPProjector(nn.Module):
    """Frame stacking + 2-layer MLP (variable output length)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mlp = nn.Sequential(
            nn.Linear(cfg.stack * cfg.input_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_dim, cfg.output_dim),
        )
        self.out = _ScaledOutput(cfg.output_dim, cfg.embed_norm)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = stack_frames(feats, lengths, self.cfg.stack)
        return self.out(self.mlp(x)), lengths


class LinearProjector(nn.Module):
    """Frame stacking + one linear layer (variable output length)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear = nn.Linear(cfg.stack * cfg.input_dim, cfg.output_dim)
        self.out = _ScaledOutput(cfg.output_dim, cfg.embed_norm)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = stack_frames(feats, lengths, self.cfg.stack)
        return self.out(self.linear(x)), lengths


Projector = BridgeFormer | MLPProjector | LinearProjector


def weights_key(projector: Projector) -> str:
    """A digest of a projector's weights (a candidate and the version made of it share it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(projector.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_projector(cfg: ProjectorConfig) -> Projector:
    """The projector module a config describes."""
    return {"bridgeformer": BridgeFormer, "mlp": MLPProjector, "linear": LinearProjector}[cfg.kind](cfg)
