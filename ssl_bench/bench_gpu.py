"""``ssl-bench bench gpu``: every GPU check of the harness in one short script (a few minutes).

Each stage that may run on an accelerator is run twice from the same inputs and seed, on the CPU and on
the device, and compared: the numbers must agree within the stated tolerance (float32 kernels differ in
summation order between devices, so bit equality is not expected), and the throughput of each side is
recorded. On a machine without a GPU the device is the CPU itself (``device="cpu"``) and the script still
runs every check, which keeps it tested; its figures then say nothing about a GPU.

Checks (tolerances are the pass criteria written into the result):
- extraction (fp32): patch features on the device vs the CPU, max |difference| of float16 rows;
- extraction (bf16 / fp16 autocast, the protocol's ``precision``): cosine of each patch to its fp32 row;
- PriMaPs-EM: the same steps on both, final prototypes' max |difference| and seconds per step;
- DatUS^2 de-noiser (and every head trained with ``stages.denoise``: COMUS' self-training): one short
  training on both, loss path and predictions' agreement, seconds per batch;
- the training loops' photometric augmentations (PriMaPs-EM's student views, HP's consistency views), which
  run where the training runs: the grey levels of the augmented images from the same draws, images per second;
- the heads' training batches: cached float16 features converted on the device (as the steps do) against
  converted on the CPU first, seconds per batch, identical numbers;
- STEGO and HP heads, ACSeg's concept generator: a few training steps on both from the same features and
  seed, the loss paths' and the trained models' outputs' largest relative difference, seconds per step. The
  checks turn off what draws from the device's own generator (feature dropout; HP's random share ``rho`` of
  the denominator, set to all patches), whose stream differs between a GPU and the CPU by design.
"""

from __future__ import annotations

import os
import time

import numpy as np

# Pass criteria. Float32 sums in another order on another device: features agree to float16 resolution,
# short trainings to a few 1e-3 of their scale; autocast features keep nearly every patch's direction;
# augmented images round to the same grey level but where a float sum lands on a half level.
TOLERANCES = {"extraction_fp32_max_abs": 2e-2, "autocast_min_cosine": 0.98, "primaps_prototypes_max_abs": 1e-3,
              "denoiser_prediction_agreement": 0.95, "head_training_max_relative": 1e-3,
              "augmentation_within_one_level": 0.999}


def _seconds(fn, repeats: int = 1):
    """(result of the last call, the fastest call's seconds)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _extract(model, images: np.ndarray, precision: str, device) -> tuple[np.ndarray, float]:
    from .data.protocol import Protocol

    protocol = Protocol(precision=precision)
    model = model.to(device)

    def run():
        x = model.normalize(images)
        with protocol.autocast(x.device):
            out = model.extract(x, {"patch"})["patch"].float()
        _sync(device)
        return out.cpu().numpy().astype(np.float16).astype(np.float32)  # as the cache keeps them

    return _seconds(run, repeats=3)


def extraction_checks(device, backbone: str = "dino-vits16", images: int = 8) -> list[dict]:
    from . import registry
    from .data import open_dataset
    from .models import build_backbone, resolve

    spec = registry.backbone(backbone)
    model = build_backbone(spec, resolve(spec, "random"), 0)
    data = open_dataset("synthetic", None, "val", n=images, size=224)
    batch = np.stack([np.asarray(data.load_image(i).convert("RGB").resize((224, 224))) for i in range(images)])
    cpu, cpu_s = _extract(model, batch, "fp32", "cpu")
    rows = []
    on_device, device_s = _extract(model, batch, "fp32", device)
    diff = float(np.abs(on_device - cpu).max())
    rows.append({"check": "extraction fp32", "device_vs_cpu_max_abs": diff,
                 "passed": diff <= TOLERANCES["extraction_fp32_max_abs"],
                 "cpu_images_per_s": images / cpu_s, "device_images_per_s": images / device_s})
    for precision in ("bf16", "fp16"):
        try:
            low, low_s = _extract(model, batch, precision, device)
        except RuntimeError as err:  # e.g. fp16 autocast on a CPU build without it
            rows.append({"check": f"extraction {precision}", "skipped": str(err).splitlines()[0]})
            continue
        a = cpu.reshape(-1, cpu.shape[-1])
        b = low.reshape(-1, low.shape[-1])
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        rows.append({"check": f"extraction {precision}", "min_cosine_to_fp32": float(cosine.min()),
                     "mean_cosine_to_fp32": float(cosine.mean()),
                     "passed": float(cosine.min()) >= TOLERANCES["autocast_min_cosine"],
                     "device_images_per_s": images / low_s, "speedup_vs_device_fp32": device_s / low_s})
    return rows


def primaps_check(device, images: int = 16, k: int = 8, steps: int = 10) -> dict:
    from .methods.primaps_em import PrimapsEM

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, 64)).astype(np.float32)
    feats = [centres[rng.integers(0, k, (20, 20))] + 0.3 * rng.normal(size=(20, 20, 64)).astype(np.float32)
             for _ in range(images)]
    proposals = [np.repeat(np.repeat(rng.integers(0, 6, (5, 5)), 4, 0), 4, 1).astype(np.int64) for _ in feats]

    def fit(where):
        model = PrimapsEM(k, pretrain_epochs=1, epochs=steps, max_steps=steps, batch_size=4, ema_every=2,
                          pca_images=images, device=where)
        model.fit(feats, proposals, seed=0)
        _sync(where)
        return model

    cpu, cpu_s = _seconds(lambda: fit("cpu"))
    dev, dev_s = _seconds(lambda: fit(device))
    theta = lambda m: m.theta_t.v.detach().cpu().numpy()  # noqa: E731
    diff = float(np.abs(theta(cpu) - theta(dev)).max())
    return {"check": "primaps-em", "steps": cpu.steps, "prototypes_max_abs": diff,
            "passed": diff <= TOLERANCES["primaps_prototypes_max_abs"],
            "cpu_s_per_step": cpu_s / cpu.steps, "device_s_per_step": dev_s / dev.steps}


def denoiser_check(device, images: int = 8, k: int = 4) -> dict:
    from .stages.denoise import DenoiserConfig, predict_denoiser, train_denoiser

    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(images)]
    masks = [np.repeat(np.repeat(rng.integers(0, k, (6, 6)), 16, 0), 16, 1) for _ in range(images)]
    config = DenoiserConfig(input_size=96, epochs=2, batch_size=4)

    def train(where):
        model, _ = train_denoiser(pics, masks, k, config, seed=0, device=where)
        _sync(where)
        return np.stack(list(predict_denoiser(model, pics, config, device=where)))

    cpu, cpu_s = _seconds(lambda: train("cpu"))
    dev, dev_s = _seconds(lambda: train(device))
    agreement = float((cpu == dev).mean())
    batches = config.epochs * max(1, images // config.batch_size)
    return {"check": "denoiser", "prediction_agreement": agreement,
            "passed": agreement >= TOLERANCES["denoiser_prediction_agreement"],
            "cpu_s_per_batch": cpu_s / batches, "device_s_per_batch": dev_s / batches}


def augmentation_check(device, images: int = 8, size: int = 224) -> dict:
    """The training loops' photometric augmentations (PriMaPs-EM's student views, HP's consistency views) on the
    CPU and on the device from the same draws: the augmented images' grey levels, and images per second."""
    import torch

    from .data import open_dataset
    from .methods import hp
    from .methods.primaps_em import photometric_augment

    data = open_dataset("synthetic", None, "val", n=images, size=size)
    pics = [np.asarray(data.load_image(i).convert("RGB").resize((size, size))) for i in range(images)]

    def augment(where):
        rng = np.random.default_rng(0)  # PriMaPs-EM draws from numpy, HP from torch's CPU generator
        torch.manual_seed(0)
        primaps = torch.stack([photometric_augment(torch.tensor(p, device=where), rng) for p in pics])
        views = hp.photometric_views([torch.tensor(p, device=where) for p in pics])
        _sync(where)
        return torch.cat([primaps, views]).cpu().numpy().astype(np.int16)

    cpu, cpu_s = _seconds(lambda: augment("cpu"), repeats=3)
    dev, dev_s = _seconds(lambda: augment(device), repeats=3)
    levels = np.abs(cpu - dev)
    within = float((levels <= 1).mean())
    return {"check": "training augmentations", "within_one_grey_level": within, "max_grey_levels": int(levels.max()),
            "passed": within >= TOLERANCES["augmentation_within_one_level"],
            "cpu_images_per_s": 2 * images / cpu_s, "device_images_per_s": 2 * images / dev_s}


def batch_check(device, views: int = 32, grid: int = 40, dim: int = 384) -> dict:
    """A training batch of cached float16 features moved to the device as the heads' steps do (``as_batch``:
    stacked on the CPU, converted and transposed on the device) against converting on the CPU first (before):
    seconds per batch, and the numbers (the same: the conversion is exact)."""
    import torch

    from .methods.heads import as_batch
    from .ops import as_float32

    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((grid, grid, dim)).astype(np.float16) for _ in range(views)]

    def on_cpu_first():
        batch = torch.from_numpy(np.stack([as_float32(m) for m in maps])).permute(0, 3, 1, 2).contiguous()
        out = batch.to(device)
        _sync(device)
        return out

    def as_the_heads_do():
        out = as_batch(maps, range(views), device)
        _sync(device)
        return out

    before, before_s = _seconds(on_cpu_first, repeats=5)
    now, now_s = _seconds(as_the_heads_do, repeats=5)
    same = bool(torch.equal(before, now))
    return {"check": "training batches", "views": views, "shape": [grid, grid, dim], "identical": same,
            "passed": same, "s_per_batch_converted_on_cpu": before_s, "s_per_batch_converted_on_device": now_s}


def _clustered_grids(views: int, grid: int = 12, dim: int = 64, k: int = 5) -> list[np.ndarray]:
    """Patch grids (grid, grid, dim) float32 of ``k`` noisy clusters in square blocks: features with structure."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    return [centres[np.repeat(np.repeat(rng.integers(0, k, (3, 3)), grid // 3, 0), grid // 3, 1)]
            + 0.3 * rng.normal(size=(grid, grid, dim)).astype(np.float32) for _ in range(views)]


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the largest |a|: one number for a loss path or a model's outputs."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(float(np.abs(a).max()), 1e-12))


def _head_row(name: str, train, steps: int, device) -> dict:
    """``train(where)`` -> (loss path, the trained model's outputs) on the CPU and on the device, compared;
    each side trained once untimed first (imports, allocator, kernel selection)."""
    train("cpu"), train(device)
    (cpu_losses, cpu_out), cpu_s = _seconds(lambda: train("cpu"))
    (dev_losses, dev_out), dev_s = _seconds(lambda: train(device))
    worst = max(_relative(cpu_losses, dev_losses), _relative(cpu_out, dev_out))
    return {"check": name, "steps": steps, "losses_max_relative": _relative(cpu_losses, dev_losses),
            "outputs_max_relative": _relative(cpu_out, dev_out),
            "passed": bool(np.isfinite(worst) and worst <= TOLERANCES["head_training_max_relative"]),
            "cpu_s_per_step": cpu_s / steps, "device_s_per_step": dev_s / steps}


def _codes(head, views: list[np.ndarray]) -> np.ndarray:
    import torch

    from .methods import heads

    device = next(head.parameters()).device
    with torch.no_grad():
        return head.eval()(heads.as_batch(views, range(len(views)), device)).cpu().numpy()


def stego_check(device, views: int = 8, steps: int = 4, batch: int = 4) -> dict:
    from . import registry
    from .methods import heads, stego

    p = {**registry.task("stego").params, "dropout": False}
    grids = _clustered_grids(views)
    neighbours = heads.nearest_neighbours(heads.global_features(grids), min(p["neighbours"], views - 1))

    def train(where):
        head, history = stego.train_head(grids, neighbours, p, steps, batch, 0, where)
        _sync(where)
        return history["loss"], _codes(head, grids)

    return _head_row("stego head", train, steps, device)


def hp_check(device, views: int = 8, steps: int = 4, batch: int = 4) -> dict:
    from . import registry
    from .methods import hp

    p = {**registry.task("hp").params, "dropout": False, "rho": 1.0, "augment": "none", "pool_size": views,
         "dim": 32}
    grids = _clustered_grids(views)
    grid = tuple(grids[0].shape[:2])

    def train(where):
        plan = {"name": "cpu", "device": str(where), "steps": steps, "batch_size": batch}
        head, history = hp.train_head(grids, lambda idx: hp.uniform_weights(len(idx), grid, p["attention_sigma"]),
                                      None, p, plan, 0, where)
        _sync(where)
        return history["loss"], _codes(head, grids)

    return _head_row("hp head", train, steps, device)


def acseg_check(device, views: int = 8, steps: int = 4, batch: int = 4) -> dict:
    import torch

    from .stages.segmenters.acseg import assignment, train_generator

    grids = _clustered_grids(views)

    def train(where):
        model, record = train_generator(grids, iterations=steps, batch_size=batch, seed=0, device=where)
        with torch.no_grad():
            x = torch.from_numpy(np.stack([g.reshape(-1, g.shape[-1]) for g in grids])).to(where)
            out = assignment(x, model(x)).cpu().numpy()
        _sync(where)
        return [record["first_loss"], record["final_loss"]], out

    return _head_row("acseg concept generator", train, steps, device)


def gpu(device: str | None = None, backbone: str = "dino-vits16", images: int = 8) -> dict:
    """Every stage on the CPU and on ``device`` from the same inputs (extraction fp32 / bf16 / fp16, PriMaPs-EM,
    the de-noiser, training augmentations and batches, STEGO / HP heads, ACSeg's generator): agreement within
    the stated tolerances, and each side's throughput. ``device`` defaults to cuda when present, else the CPU
    (see the module docstring)."""
    import torch

    from .runner import usable_device

    device = str(usable_device(device))  # a device this machine lacks: one line, as run --device says it
    started = time.perf_counter()
    checks = [*extraction_checks(device, backbone, images), primaps_check(device), denoiser_check(device),
              augmentation_check(device), batch_check(device), stego_check(device), hp_check(device),
              acseg_check(device)]
    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "none"
    return {"device": device, "gpu": name,
            "note": None if name != "none" else "no GPU here: the device side is the CPU, so these figures only "
                                                 "show that every check runs",
            "tolerances": TOLERANCES, "checks": checks,
            "all_passed": all(c.get("passed", True) for c in checks),
            "seconds": time.perf_counter() - started, "load_average_1min": os.getloadavg()[0]}
