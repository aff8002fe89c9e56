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

Where the project is silent, the authors' code (github.com/BMehron/Unsupervised-Segmentation:
extract/DSM_Train_Notebook.ipynb trains the reported model, extract/transformer_archs.py holds its classes;
read for comparison, nothing copied) settles it:
- the FFN is Linear(d, 512), ReLU, Linear(512, d) (``ffn_width`` 512; its checkpoint's lin1 is 512 x 384).
  Until this was read we used the transformer's 4d and GELU: 3x the FFN's arithmetic;
- one head ("a single head of attention", the code's NUM_HEADS = 1); AdamW with its default weight decay 0.01;
- N in the bounds is the number of rows in the batch (the loss sees one batch), as its loss computes it
  (it floors N / k^2 and N / sqrt(k) to whole numbers; we keep the paper's real-valued bounds);
- its data: 239,750 DSM regions of VOC 2012 (384-d DINO ViT-S/16 crop features, L2-normalised), so 500 epochs
  of batch 4096 were 29,500 AdamW steps (on a GPU). At 100k regions the paper setting is 12,500 steps.
Where we differ from the code, written down: the centres start at k distinct regions drawn with the seed (the
code draws N(0, 2/d); at the step counts of smaller sets a random start barely moves at lr 3e-5); the FFN keeps
the paper's residual and LayerNorm (the code's final inference class drops them, but its checkpoint's second
LayerNorm has a trained bias, so training ran one).

Speed: a training step is ~10 GFLOP at batch 4096, d = 384, k = 27, almost all of it the FFN's six products
(forward, input and weight gradients). The attention is computed in closed form around the k centres
(``attend_to_centres``): the same function as torch's MultiheadAttention on the same parameters, without its
two n x d x d products. ``ssl-bench bench clusterers`` gives the FLOP floor of the paper setting on the
machine it runs on next to the measured time.

Stopping (opt-in, ours: the paper trains a fixed 500 epochs and gives no rule): ``stop_label_change`` stops
once fewer than that fraction of regions changed their argmax over each of the last ``stop_patience`` epochs
(each region's argmax is read when its batch passes, at no extra cost; ``ssl-bench bench abc-stopping``
measures it against the full run); ``max_steps`` caps the steps. The
record ``fit_stats_`` (kept in a run's stats) says whether the paper's setting ran in full.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from . import InputTransform, check_enough_rows


class AttentionClusteringNet(nn.Module):
    def __init__(self, centres: torch.Tensor, layers: int = 1, heads: int = 1, attention: bool = True,
                 mlp: bool = True, ffn_width: int = 512):
        super().__init__()
        d = centres.shape[1]
        self.centres = nn.Parameter(centres.clone())
        self.attention = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers)) \
            if attention else None
        self.attention_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers)) if attention else None
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(d, ffn_width), nn.ReLU(), nn.Linear(ffn_width, d))
                                 for _ in range(layers)) if mlp else None
        self.ffn_norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers)) if mlp else None
        self.layers = layers if (attention or mlp) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft assignment ReLU(cos(Y, M)) (n, k) of regions x (n, d)."""
        y = x
        for i in range(self.layers):
            if self.attention is not None:
                y = self.attention_norm[i](y + attend_to_centres(self.attention[i], y, self.centres))
            if self.ffn is not None:
                y = self.ffn_norm[i](y + self.ffn[i](y))
        cos = nn.functional.normalize(y, dim=1) @ nn.functional.normalize(self.centres, dim=1).T
        return torch.relu(cos)


def attend_to_centres(attention: nn.MultiheadAttention, queries: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``attention(queries, centres, centres)`` (no mask, no dropout) of torch's MultiheadAttention, its own
    parameters, with the products regrouped around the k << d centres: scores = X (W_q^T K^T) + b_q K^T and
    output = P (V W_o^T) + b_o, instead of (X W_q^T) K^T and (P V) W_o^T. The same function up to float
    rounding, without the two n x d x d products of torch's order (16.0 -> 10.5 GFLOP per training step at
    n = 4096, k = 27, d = 384, FFN 512): only n x d x k ones remain."""
    n, d = queries.shape
    k, heads = len(centres), attention.num_heads
    head_dim = d // heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    keys = (centres @ w_k.T + b_k).view(k, heads, head_dim) * head_dim ** -0.5  # the softmax scale, on k rows
    values = (centres @ w_v.T + b_v).view(k, heads, head_dim)
    score_map = torch.einsum("hed,jhe->dhj", w_q.view(heads, head_dim, d), keys).reshape(d, heads * k)
    score_bias = torch.einsum("he,jhe->hj", b_q.view(heads, head_dim), keys)
    weights = ((queries @ score_map).view(n, heads, k) + score_bias).softmax(-1)
    # the heads' outputs concatenated, times W_o^T: each head's values through its own columns of W_o
    value_map = torch.einsum("jhe,dhe->hjd", values, attention.out_proj.weight.view(d, heads, head_dim))
    return weights.reshape(n, heads * k) @ value_map.reshape(heads * k, d) + attention.out_proj.bias


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


PAPER = {"layers": 1, "heads": 1, "attention": True, "mlp": True, "ffn_width": 512, "epochs": 500, "batch_size": 4096,
         "lr": 3e-5, "min_size_exponent": 2.0, "max_size_exponent": 0.5}  # Sec. 4.2.1, Tables 2-3; the width: its code


class AttentionClustering:
    """The clusterer stage ``abc``."""

    def __init__(self, k: int, seed: int = 0, layers: int = 1, heads: int = 1, attention: bool = True,
                 mlp: bool = True, ffn_width: int = 512, epochs: int = 500, batch_size: int = 4096, lr: float = 3e-5,
                 min_size_exponent: float = 2.0, max_size_exponent: float = 0.5, max_steps: int | None = None,
                 stop_label_change: float | None = None, stop_patience: int = 10,
                 normalize: bool = True, standardize: bool = False, pca_dim: int = 0, device: str = "cpu"):
        self.k, self.seed = k, seed
        self.architecture = dict(layers=layers, heads=heads, attention=attention, mlp=mlp, ffn_width=ffn_width)
        self.epochs, self.batch_size, self.lr, self.max_steps = epochs, batch_size, lr, max_steps
        self.stop_label_change, self.stop_patience = stop_label_change, stop_patience
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
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=fork):  # the caller's torch RNG is left as it was
            torch.manual_seed(self.seed)
            start = data[torch.from_numpy(rng.choice(len(x), self.k, replace=False)).to(self.device)]
            self.net = AttentionClusteringNet(start, **self.architecture).to(self.device)
            optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr)
            steps, stopped, self.losses_, self.label_changes_ = 0, "epochs", [], []
            # each region's argmax when its batch last passed (the optional stopping rule compares epochs)
            seen = torch.full((len(x),), -1, dtype=torch.int64, device=self.device) \
                if self.stop_label_change is not None else None
            for _ in range(self.epochs):
                previous = seen.clone() if seen is not None else None
                order = torch.from_numpy(rng.permutation(len(x))).to(self.device)
                for batch in order.split(self.batch_size):
                    output = self.net(data[batch])
                    loss = abc_loss(output, *self.bounds)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if previous is not None:
                        seen[batch] = output.detach().argmax(1)
                    steps += 1
                    if self.max_steps is not None and steps >= self.max_steps:
                        stopped = "max_steps"
                        break
                self.losses_.append(loss.item())  # one sync per epoch, none per step
                if stopped == "max_steps":
                    break
                if previous is not None and self._labels_settled(previous, seen):
                    stopped = "labels settled"
                    break
        self.steps_, self.train_seconds_ = steps, time.perf_counter() - t0
        self.labels_, self.uncertainty_ = self._assign(data)
        self.fit_stats_ = self._record(stopped)
        return self

    def _labels_settled(self, previous: torch.Tensor, seen: torch.Tensor) -> bool:
        """The opt-in stopping rule: fewer than ``stop_label_change`` of the regions changed their argmax over
        each of the last ``stop_patience`` epochs (the first epoch, which has nothing to compare, never counts)."""
        if (previous < 0).any():
            return False
        self.label_changes_.append((seen != previous).float().mean().item())
        recent = self.label_changes_[-self.stop_patience:]
        return len(recent) == self.stop_patience and max(recent) < self.stop_label_change

    def _record(self, stopped: str) -> dict:
        """The training record a run's stats keep: when it stopped and whether the paper's setting ran."""
        mine = {**self.architecture, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "min_size_exponent": self.bounds[0], "max_size_exponent": self.bounds[1]}
        differs = [f"{key}={mine[key]} (paper {PAPER[key]})" for key in PAPER if mine[key] != PAPER[key]]
        if stopped != "epochs":
            differs.append(f"stopped by {stopped} after epoch {len(self.losses_)} of {self.epochs}")
        return {"steps": self.steps_, "epochs_run": len(self.losses_), "stopped": stopped,
                "last_batch_loss": self.losses_[-1], "train_seconds": round(self.train_seconds_, 3),
                "configuration": "paper" if not differs else "not the paper's: " + ", ".join(differs)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        data = torch.from_numpy(np.ascontiguousarray(self.transform.transform(x), dtype=np.float32))
        return self._assign(data.to(self.device))[0]

    def _assign(self, data: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            output = torch.cat([self.net(part) for part in data.split(self.batch_size)]).cpu().numpy()
        return output.argmax(1).astype(np.int64), 1.0 - output.max(1)


def check_params(p: dict) -> None:
    if p["layers"] < 1 or p["heads"] < 1 or p["ffn_width"] < 1:
        raise UserError("layers, heads and ffn_width must be 1 or more (-p clusterer.layers=1)")
    if p["batch_size"] < 2 or p["epochs"] < 1:
        raise UserError(f"batch_size={p['batch_size']}, epochs={p['epochs']} -- use a batch of 2 or more and 1 "
                        f"epoch or more (-p clusterer.batch_size=4096 -p clusterer.epochs=500)")
    if not p["lr"] > 0:
        raise UserError(f"lr={p['lr']} -- use a positive learning rate (-p clusterer.lr=3e-5)")
    if p["max_steps"] is not None and (not isinstance(p["max_steps"], int) or p["max_steps"] < 1):
        raise UserError(f"max_steps={p['max_steps']!r} -- use null or a whole number >= 1")
    change = p["stop_label_change"]
    if change is not None and not (isinstance(change, (int, float)) and 0 < change < 1):
        raise UserError(f"stop_label_change={change!r} -- use null (the paper's fixed epochs) or a fraction of "
                        f"regions between 0 and 1, e.g. 0.001")
    if not isinstance(p["stop_patience"], int) or p["stop_patience"] < 1:
        raise UserError(f"stop_patience={p['stop_patience']!r} -- use a whole number of epochs >= 1")
