"""Attention-based clustering (ABC) of the semester project (paper 003, Sec. 3.2.1, 4.2.1, Tables 2-3).

``k`` learnable cluster centres M (k, d). Each of ``layers`` update steps is a cross-attention with the
regions X as queries and M as keys and values, then a feed-forward network, each with a residual connection
and LayerNorm, "following the transformer architecture": Y = LN(X + Attn(X, M, M)), Y = LN(Y + FFN(Y)).
The soft assignment is ReLU(cos(Y, M)); the loss is coverage + disjointness:
- coverage: mean ReLU(1 - row sum) (every region covered by at least one cluster) + mean ReLU(N / k^a -
  column sum) + mean ReLU(column sum - N / k^b) (cluster sizes between N / k^2 and N / sqrt(k), Table 3's
  best bounds: ``min_size_exponent`` a = 2, ``max_size_exponent`` b = 0.5; b = 0 bounds nothing);
- disjointness: the sum of the off-diagonal entries of output^T output.
Trained with AdamW at lr 3e-5, batch 4096, 500 epochs; a region's cluster is the argmax of its assignment.
Table 2's architectures are ``layers`` (1 or 2), ``attention`` and ``mlp`` switches ("Identical" is neither:
the regions themselves against M).

Where the project is silent (written down): N in the bounds is the number of rows in the batch (the loss
sees one batch); the centres start at k distinct regions drawn with the seed (a random start barely moves at
lr 3e-5); one attention head (Table 2's best); the FFN's hidden width is ``ffn_ratio`` x d (4, the
transformer convention); AdamW's default weight decay (0.01).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from . import InputTransform, check_enough_rows


class AttentionClusteringNet(nn.Module):
    def __init__(self, centres: torch.Tensor, layers: int = 1, heads: int = 1, attention: bool = True,
                 mlp: bool = True, ffn_ratio: int = 4):
        super().__init__()
        d = centres.shape[1]
        self.centres = nn.Parameter(centres.clone())
        self.attention = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers)) \
            if attention else None
        self.attention_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers)) if attention else None
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, ffn_ratio * d), nn.GELU(), nn.Linear(ffn_ratio * d, d))
                                 for _ in range(layers)) if mlp else None
        self.ffn_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers)) if mlp else None
        self.layers = layers if (attention or mlp) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft assignment ReLU(cos(Y, M)) (n, k) of regions x (n, d)."""
        y = x
        memory = self.centres[None]
        for i in range(self.layers):
            if self.attention is not None:
                attended, _ = self.attention[i](y[None], memory, memory, need_weights=False)
                y = self.attention_norm[i](y + attended[0])
            if self.ffn is not None:
                y = self.ffn_norm[i](y + self.ffn[i](y))
        cos = nn.functional.normalize(y, dim=1) @ nn.functional.normalize(self.centres, dim=1).T
        return torch.relu(cos)


def abc_loss(output: torch.Tensor, min_size_exponent: float = 2.0, max_size_exponent: float = 0.5) -> torch.Tensor:
    """Coverage + disjointness of a soft assignment (n, k) (the project's Eq. 2 and its disjointness)."""
    n, k = output.shape
    sizes = output.sum(0)
    coverage = torch.relu(1 - output.sum(1)).mean() + torch.relu(n / k ** min_size_exponent - sizes).mean()
    if max_size_exponent > 0:  # 0: the bound would be N, which no cluster exceeds
        coverage = coverage + torch.relu(sizes - n / k ** max_size_exponent).mean()
    overlap = output.T @ output
    disjointness = overlap.sum() - overlap.diagonal().sum()
    return coverage + disjointness


class AttentionClustering:
    """The clusterer stage ``abc``."""

    def __init__(self, k: int, seed: int = 0, layers: int = 1, heads: int = 1, attention: bool = True,
                 mlp: bool = True, ffn_ratio: int = 4, epochs: int = 500, batch_size: int = 4096, lr: float = 3e-5,
                 min_size_exponent: float = 2.0, max_size_exponent: float = 0.5, max_steps: int | None = None,
                 normalize: bool = True, standardize: bool = False, pca_dim: int = 0, device: str = "cpu"):
        self.k, self.seed = k, seed
        self.architecture = dict(layers=layers, heads=heads, attention=attention, mlp=mlp, ffn_ratio=ffn_ratio)
        self.epochs, self.batch_size, self.lr, self.max_steps = epochs, batch_size, lr, max_steps
        self.bounds = (min_size_exponent, max_size_exponent)
        self.transform = InputTransform(normalize, standardize, pca_dim)
        self.device = torch.device(device)

    @classmethod
    def from_context(cls, ctx, **params):
        return cls(**params, device=str(ctx.device))

    def fit(self, x: np.ndarray) -> "AttentionClustering":
        x = self.transform.fit_transform(x)
        check_enough_rows(len(x), self.k)
        rng = np.random.default_rng(self.seed)
        data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        fork = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):  # the caller's torch RNG is left as it was
            torch.manual_seed(self.seed)
            start = data[torch.from_numpy(rng.choice(len(x), self.k, replace=False)).to(self.device)]
            self.net = AttentionClusteringNet(start, **self.architecture).to(self.device)
            optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr)
            steps, self.losses_ = 0, []
            for _ in range(self.epochs):
                order = torch.from_numpy(rng.permutation(len(x))).to(self.device)
                for batch in order.split(self.batch_size):
                    loss = abc_loss(self.net(data[batch]), *self.bounds)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                    if self.max_steps is not None and steps >= self.max_steps:
                        break
                self.losses_.append(loss.item())
                if self.max_steps is not None and steps >= self.max_steps:
                    break
        self.steps_ = steps
        self.labels_, self.uncertainty_ = self._assign(data)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        data = torch.from_numpy(np.ascontiguousarray(self.transform.transform(x), dtype=np.float32))
        return self._assign(data.to(self.device))[0]

    def _assign(self, data: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            output = torch.cat([self.net(part) for part in data.split(self.batch_size)]).cpu().numpy()
        return output.argmax(1).astype(np.int64), 1.0 - output.max(1)


def check_params(p: dict) -> None:
    if p["layers"] < 1 or p["heads"] < 1 or p["ffn_ratio"] < 1:
        raise UserError("layers, heads and ffn_ratio must be 1 or more (-p clusterer.layers=1)")
    if p["batch_size"] < 2 or p["epochs"] < 1:
        raise UserError(f"batch_size={p['batch_size']}, epochs={p['epochs']} -- use a batch of 2 or more and 1 "
                        f"epoch or more (-p clusterer.batch_size=4096 -p clusterer.epochs=500)")
    if not p["lr"] > 0:
        raise UserError(f"lr={p['lr']} -- use a positive learning rate (-p clusterer.lr=3e-5)")
    if p["max_steps"] is not None and (not isinstance(p["max_steps"], int) or p["max_steps"] < 1):
        raise UserError(f"max_steps={p['max_steps']!r} -- use null or a whole number >= 1")
