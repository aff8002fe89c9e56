"""Where weights come from, and how official checkpoint files are unwrapped into a plain state dict.

Resolution order: ``--weights PATH``; the local weights folder ``$SSL_BENCH_WEIGHTS``; the hub caches
of timm / Hugging Face / torch.hub. Nothing found offline is one line naming the file and where to put it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import UserError
from ..registry import BackboneSpec

RANDOM = "random"


@dataclass(frozen=True)
class WeightsSource:
    path: Path | None  # None: nothing to load (random initialisation, or a non-learned backbone)
    identity: str  # sha256 of the file, "random:<seed>", or "none"
    origin: str  # "random", "non-learned", "--weights", "$SSL_BENCH_WEIGHTS", "timm cache", ...
    own: bool = False  # a user's checkpoint (--weights PATH that is not the registry's file): not its pre-training

    @property
    def is_random(self) -> bool:
        return self.origin == RANDOM


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def expected_file(spec: BackboneSpec) -> str:
    return spec.file or (spec.url.rsplit("/", 1)[-1] if spec.url else f"{spec.name}.pth")


HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face model folder holds


def _hub_candidates(spec: BackboneSpec) -> list[tuple[str, Path]]:
    """Files the usual hub caches would hold for this entry (checked in order, none downloaded): the timm and
    Hugging Face caches (or, for ``hf:/a/folder``, that folder), torch.hub's, and open_clip's for URL downloads."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    names = tuple(spec.files) + HUB_FILES
    out = []
    for origin, repo in (("timm cache", f"timm/{spec.timm}" if spec.timm else None), ("Hugging Face cache", spec.hf)):
        if repo and Path(repo).is_absolute():  # a model folder of the user's (hf:/path)
            out += [("model folder", Path(repo) / name) for name in names]
        elif repo:
            snapshots = hf_home / f"models--{repo.replace('/', '--')}" / "snapshots"
            for name in names:
                out += [(origin, p) for p in sorted(snapshots.glob(f"*/{name}"))]
    out.append(("torch.hub cache", torch_home / "hub" / "checkpoints" / expected_file(spec)))
    if spec.url and spec.family == "open_clip":  # open_clip keeps URL downloads in ~/.cache/clip
        out.append(("open_clip cache", Path.home() / ".cache" / "clip" / spec.url.rsplit("/", 1)[-1]))
    return out


def locate(spec: BackboneSpec) -> tuple[str, Path] | None:
    """(origin, path) of the first local file holding ``spec``'s weights, without reading it."""
    local = os.environ.get("SSL_BENCH_WEIGHTS")
    candidates = [("$SSL_BENCH_WEIGHTS", Path(local) / expected_file(spec))] if local else []
    return next(((origin, path) for origin, path in candidates + _hub_candidates(spec) if path.is_file()), None)


def is_non_learned(spec: BackboneSpec) -> bool:
    """Backbones with nothing to load (e.g. the reference statistics): never "random weights"."""
    return spec.family == "reference"


def resolve(spec: BackboneSpec, weights: str | None, seed: int = 0) -> WeightsSource:
    """Find the weights for ``spec``; ``weights`` is a path, ``"random"``, or None (search)."""
    if is_non_learned(spec):
        if weights and weights != RANDOM:  # "random" here: the runner warns (a real run, not the smoke run asked)
            raise UserError(f"{spec.name} is not learned: it has no weights to load, --weights {weights} would be "
                            f"ignored -- drop --weights, or choose a learned backbone (ssl-bench list backbones)")
        return WeightsSource(None, "none", "non-learned")
    if weights == RANDOM:
        return WeightsSource(None, f"random:{seed}", RANDOM)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights {weights}: no such file -- give the checkpoint's path (a sweep or suite file's "
                            f"paths are read from that file's folder), or --weights random for a smoke run")
        identity = _identity(spec, path)
        # The registry's own file (its name, or its published sha256) keeps the registry's description;
        # any other file is the user's checkpoint, whose training the registry knows nothing of.
        official = path.name == expected_file(spec) or bool(spec.sha256 and identity.startswith(spec.sha256))
        return WeightsSource(path, identity, "--weights", own=not official)
    found = locate(spec)
    if found:
        origin, path = found
        return WeightsSource(path, _identity(spec, path), origin)
    local = os.environ.get("SSL_BENCH_WEIGHTS")
    where = f"$SSL_BENCH_WEIGHTS ({local})" if local else "a folder named by $SSL_BENCH_WEIGHTS"
    if local and not Path(local).is_dir():
        where += ", which does not exist yet"
    hub = spec.hf or (f"timm/{spec.timm}" if spec.timm else None)
    source = f" (download: {spec.url})" if spec.url else (f" (Hugging Face: {hub})" if hub else "")
    raise UserError(f"no weights for {spec.name}: put {expected_file(spec)}{source} in {where}, "
                    "or pass --weights PATH, or --weights random for a smoke run")


@lru_cache(maxsize=64)
def _sha256_memo(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file version (size, mtime): a sweep resolves a checkpoint once per cell, reads it once."""
    return sha256_of(path)


def file_identity(path: Path) -> str:
    """sha256 of a weights file, read once per file version (size, time stamp) in this process."""
    real = path.resolve()
    stat = real.stat()
    return _sha256_memo(real, stat.st_size, stat.st_mtime_ns)


def _identity(spec: BackboneSpec, path: Path) -> str:
    digest = file_identity(path)
    if spec.sha256 and path.name == expected_file(spec) and not digest.startswith(spec.sha256):
        raise UserError(f"{path} has sha256 {digest[:12]}..., the registry expects {spec.sha256[:12]}... "
                        "for that file -- download it again")
    return digest


def read_checkpoint(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file gets the same advice
        reason = (str(err).strip().splitlines() or [""])[0][:100]
        if not reason and path.is_file() and path.stat().st_size == 0:
            reason = "the file is empty"
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        raise UserError(f"cannot read checkpoint {path} ({reason}) -- is it a "
                        f"{'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} file?") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict -- save "
                        f"model.state_dict() (or the official release file)")
    return checkpoint


# Wrappers of the official releases, most specific first: DINO/iBOT/Mugs keep the teacher
# beside the student; MoCo and many trainers keep the model under 'state_dict' or 'model'.
DEFAULT_WRAPPERS = ("teacher", "target_encoder", "state_dict", "model", "module", "student")
STRIP_PREFIXES = ("module.", "encoder.")  # stripped when every key has them (DDP, plain encoders)
SELECT_PREFIXES = ("backbone.",)  # select the backbone beside heads (DINO's MultiCropWrapper)


def unwrap_state_dict(checkpoint: dict, layout: dict | None = None) -> dict[str, torch.Tensor]:
    """Plain ``{key: tensor}`` from an official checkpoint: wrapper dicts and key prefixes removed.

    ``layout`` (the registry's ``checkpoint`` field) may give ``wrappers`` (dict keys to descend
    into, in order of preference), ``prefixes`` (key prefixes selecting and stripping the model,
    e.g. MoCo's ``module.encoder_q.``) and ``drop`` (prefixes of keys to discard, e.g. heads)."""
    layout = layout or {}
    state = checkpoint
    wrappers = tuple(layout.get("wrappers", ())) + DEFAULT_WRAPPERS
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        key = next((w for w in wrappers if isinstance(state.get(w), dict)), None)
        if key is None:
            raise UserError(f"checkpoint has no model weights under {sorted(state)} -- "
                            "expected a state dict or one wrapped in teacher/student/state_dict/model")
        state = state[key]
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    for prefix in layout.get("prefixes", ()):  # family prefix selects the sub-model (e.g. MoCo query encoder)
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    changed = True
    while changed:  # generic wrappers may nest: 'module.backbone.'
        changed = False
        for prefix in STRIP_PREFIXES + SELECT_PREFIXES:
            hits = [k.startswith(prefix) for k in state]
            if hits and (all(hits) or (prefix in SELECT_PREFIXES and any(hits))):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                changed = True
    drop = tuple(layout.get("drop", ()))
    return {k: v for k, v in state.items() if not (drop and k.startswith(drop))}


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, ignore=()) -> None:
    """Strict load that tells the user which keys do not fit, in one line (weights of another shape: e.g. a
    ViT-B file given for a ViT-S entry)."""
    own = model.state_dict()
    other = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if other:
        key, theirs, ours = other[0]
        raise UserError(f"checkpoint does not fit {name}: {len(other)} weights have another shape (e.g. {key}: "
                        f"{theirs} in the file, {ours} in {name}) -- is it the file of another model size?")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(ignore))]
    if missing:
        raise UserError(f"checkpoint does not fit {name}: {len(missing)} weights missing (e.g. {missing[:3]}) "
                        "-- is it the right file for this backbone?")
