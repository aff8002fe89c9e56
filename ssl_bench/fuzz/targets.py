"""The readers ``ssl-bench fuzz`` damages input for: each builds a small valid input and reads it back.

A target's ``correct`` says what may come back from damaged files: for the verified formats (feature
and label cache, kept values, panel samples) exactly the original data, since damage there must be
detected; for the formats a user supplies (images, masks, checkpoints, YAML, the store) a result of the
right kind, since a damaged pixel or weight is still an image or a weight.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from . import Case, Target

CLS_SMALL = 32  # protocol resize of every target: small inputs, fast cases


def _rgb(shape=(30, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _ids(shape=(30, 40), high=12, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape, dtype=np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- dataset formats: one image and mask (or two) per format ------------------------------------------------

def _camvid(root: Path) -> list[Path]:
    _write(root / "val.txt", "/SegNet/CamVid/val/a.png /SegNet/CamVid/valannot/a.png\n")
    _save(_rgb(), root / "val" / "a.png")
    return [root / "val.txt", _save(_ids(high=12), root / "valannot" / "a.png")]


def _suim(root: Path) -> list[Path]:
    _save(_rgb(), root / "images" / "a.jpg")
    colours = np.array([[0, 0, 0], [0, 0, 255], [255, 255, 0], [255, 0, 0]], np.uint8)
    return [_save(colours[_ids(high=4)], root / "masks" / "a.bmp")]


def _voc2012(root: Path) -> list[Path]:
    _write(root / "ImageSets" / "Segmentation" / "val.txt", "a\n")
    _save(_rgb(), root / "JPEGImages" / "a.jpg")
    mask = Image.fromarray(np.where(_ids(high=22) == 21, 255, _ids(high=22)).astype(np.uint8), "P")
    mask.putpalette(np.random.default_rng(2).integers(0, 256, 768, dtype=np.uint8).tolist())
    path = root / "SegmentationClass" / "a.png"
    path.parent.mkdir(parents=True)
    mask.save(path)
    return [root / "ImageSets" / "Segmentation" / "val.txt", path]


def _cityscapes27(root: Path) -> list[Path]:
    _save(_rgb(), root / "leftImg8bit" / "val" / "city" / "a_leftImg8bit.png")
    return [_save(_ids(high=34), root / "gtFine" / "val" / "city" / "a_gtFine_labelIds.png")]


def _cocostuff27(root: Path) -> list[Path]:
    listing = _write(root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt", "a\n")
    _save(_rgb(), root / "images" / "val2017" / "a.jpg")
    return [listing, _save(np.where(_ids(high=190) > 181, 255, _ids(high=190)).astype(np.uint8),
                           root / "annotations" / "val2017" / "a.png")]


def _potsdam3(root: Path) -> list[Path]:
    _save(_rgb(), root / "img_dir" / "val" / "a.png")
    return [_save(_ids(high=7), root / "ann_dir" / "val" / "a.png")]


def _potsdam3_mat(root: Path) -> list[Path]:
    from scipy.io import savemat

    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    listing = _write(root / "labelled_test.txt", "a\n")
    savemat(root / "imgs" / "a.mat", {"img": np.concatenate([_rgb(), _rgb(seed=3)[..., :1]], axis=2)})
    savemat(root / "gt" / "a.mat", {"gt": _ids(high=6)})
    return [listing, root / "imgs" / "a.mat", root / "gt" / "a.mat"]


def _folder(root: Path) -> list[Path]:
    classes = _write(root / "classes.txt", "x\ny\nz\n")
    _save(_rgb(), root / "images" / "a.png")
    _save(_rgb(seed=5), root / "images" / "b.jpg", quality=90)
    return [classes, _save(_ids(high=3), root / "masks" / "a.png"), _save(_ids(high=3, seed=6), root / "masks" / "b.png")]


FORMATS = {"camvid": (_camvid, "val"), "suim": (_suim, "test"), "voc2012": (_voc2012, "val"),
           "cityscapes27": (_cityscapes27, "val"), "cocostuff27": (_cocostuff27, "val"),
           "potsdam3": (_potsdam3, "val"), "potsdam3-mat": (_potsdam3_mat, "val"), "folder": (_folder, "val")}


CANDIDATES = "damage-candidates.txt"  # written by a build: the files a case may damage (relative paths)


def _build_format(name: str, images: bool):
    def build(root: Path) -> None:
        masks = FORMATS[name][0](root)
        files = sorted(str(p.relative_to(root)) for p in (root / "images").glob("*")) if images else \
            [str(p.relative_to(root)) for p in masks]
        (root / CANDIDATES).write_text("\n".join(files))
    return build


def _candidates(root: Path) -> list[Path]:
    return [root / line for line in (root / CANDIDATES).read_text().splitlines()]


def _dataset_case(name: str, images: bool):
    """Masks (and split lists) of one format, decoded through the label cache as every cell does; or, with
    ``images``, the images of a folder dataset brought to protocol resolution."""
    def case(root: Path) -> Case:
        from ..data import Protocol, open_dataset
        from ..features import FeatureCache

        protocol = Protocol(resize=CLS_SMALL)

        def read():
            dataset = open_dataset(name.removesuffix("-mat"), root, FORMATS[name][1])
            if images:
                return [protocol.apply_image(dataset.load_image(i), 16) for i in range(len(dataset))]
            labels = FeatureCache(root / "_cache").labels.ensure(dataset, protocol, 16)
            return [(labels[i], dataset.num_classes) for i in range(len(labels))]

        def correct(result) -> bool:
            if images:
                return all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.shape[0] % 16 == 0
                           and a.shape[1] % 16 == 0 and a.size for a in result)
            return all(label.dtype == np.int64 and label.ndim == 2 and label.size and label.min() >= -1
                       and label.max() < classes for label, classes in result)

        return Case(_candidates(root), read, correct)
    return case


def _dataset_target(name: str, images: bool = False) -> Target:
    what = "images (PNG, JPEG) brought to protocol resolution" if images else \
        f"{name} masks and split lists, decoded through the label cache"
    return Target(f"images-{name}" if images else f"masks-{name}", what, _build_format(name, images),
                  _dataset_case(name, images))


# ---- checkpoints --------------------------------------------------------------------------------------------

def _small_net():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


def _build_checkpoints(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = _small_net().state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3, "args": {"lr": 0.1}},
               root / "checkpoint.pth")  # DINO's release layout
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors")


def _checkpoint_case(name: str):
    def case(root: Path) -> Case:
        from ..models.weights import load_into, read_checkpoint, unwrap_state_dict

        def read():
            model = _small_net()
            load_into(model, unwrap_state_dict(read_checkpoint(root / name)), "a small test network")
            return model

        return Case([root / name], read, lambda model: model is not None)
    return case


# ---- the cache, kept values, samples and the store: one real small run ------------------------------------

RUN_OPTIONS = (("n", 3), ("size", 48))
KEPT = {"segments": [np.arange(12, dtype=np.int16).reshape(3, 4)], "infos": [{"n_valid": 2, "valid_sizes": [3, 9]}],
        "sizes": [(48, 48)], "features": np.linspace(0, 1, 10, dtype=np.float32).reshape(2, 5)}


def _run_config(seed: int = 0):
    from ..data.protocol import Protocol
    from ..runner import RunConfig

    return RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=RUN_OPTIONS,
                     seed=seed, protocol=Protocol(resize=CLS_SMALL))


def _runner(root: Path, store: bool = True):
    from ..features import FeatureCache
    from ..runner import Runner
    from ..store import ResultStore

    return Runner(ResultStore(root / "store" / "results.sqlite") if store else None, FeatureCache(root / "cache"), "cpu")


def _read_cache(root: Path):
    from ..runner import TaskContext

    runner = _runner(root, store=False)
    run = runner.resolve(_run_config())
    features = runner.cache.ensure(runner.backbone(run.spec, run.weights, 0), run.weights.identity, run.dataset,
                                   run.protocol, ["cls", "patch"], batch_size=1, workers=0)
    labels = TaskContext(runner, run, lambda it, **_: it).evaluated_labels
    return {"patch": np.asarray(features["patch"].flat), "cls": np.asarray(features["cls"].flat),
            "labels": np.asarray(labels.flat)}


def _build_run(root: Path) -> None:
    from .. import samples
    from ..integrity import save_value
    from ..runner import TaskContext

    runner = _runner(root)
    for seed in (0, 1):
        runner.run(_run_config(seed))
    np.savez(root / "expected.npz", **_read_cache(root))  # what the cache holds, to compare damaged reads with
    ctx = TaskContext(runner, runner.resolve(_run_config()), lambda it, **_: it)
    ctx.reuse("fuzz", {}, lambda: KEPT)
    kept = [samples.load(runner.store.path, r["config_hash"]) for r in runner.store.query()]
    save_value(root / "expected-samples.npz", [list(dataclasses.astuple(k)) for k in kept])


def _expected(root: Path) -> dict:
    with np.load(root / "expected.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _cache_case(root: Path) -> Case:
    files = [p for p in (root / "cache").rglob("*") if p.is_file() and p.suffix != ".lock" and "reuse" not in p.parts]
    expected = _expected(root)
    return Case(files, lambda: _read_cache(root),
                lambda got: all(np.array_equal(got[k], expected[k]) for k in expected))


def _kept_case(root: Path) -> Case:
    from ..integrity import same_value
    from ..runner import TaskContext

    def read():
        runner = _runner(root, store=False)
        ctx = TaskContext(runner, runner.resolve(_run_config()), lambda it, **_: it)
        return ctx.reuse("fuzz", {}, lambda: KEPT)  # damaged: computed again, which gives KEPT too

    return Case(sorted((root / "cache").rglob("reuse/*.npz")), read, lambda got: same_value(got, KEPT))


def _samples_case(root: Path) -> Case:
    from .. import samples
    from ..integrity import load_value, same_value
    from ..store import ResultStore

    store = root / "store" / "results.sqlite"
    hashes = [r["config_hash"] for r in ResultStore(store, read_only=True).query()]
    expected = load_value(root / "expected-samples.npz")  # written by the build, never damaged

    def correct(got) -> bool:
        return all(g is None or same_value(list(dataclasses.astuple(g)), e) for g, e in zip(got, expected))

    return Case(sorted((root / "store" / "samples").glob("*.npz")), lambda: [samples.load(store, h) for h in hashes],
                correct)


def _store_case(root: Path) -> Case:
    from ..report import text_report
    from ..store import ResultStore

    def read():
        records = ResultStore(root / "store" / "results.sqlite", read_only=True).query()
        return [text_report(records, "markdown", "all", "classes", None),
                text_report(records, "csv", "leaderboard", "2C", None)]

    return Case([root / "store" / "results.sqlite"], read, lambda texts: all(isinstance(t, str) for t in texts))


# ---- YAML: sweep files and the registries ---------------------------------------------------------------------

def _build_yaml(root: Path) -> None:
    from ..registry import registry_dir

    checkout = registry_dir("tasks").parent
    shutil.copy(checkout / "examples" / "sweep.yaml", root / "sweep.yaml") if (checkout / "examples").is_dir() else \
        _write(root / "sweep.yaml", "backbones: [reference, {name: dino-vits16, weights: random}]\ntasks: [kmeans]\n"
                                    "datasets: [{name: synthetic, options: {n: 16}}]\nk: [C, 2C]\nseeds: [0, 1]\n")
    for kind in ("backbones", "tasks", "stages"):
        shutil.copytree(registry_dir(kind), root / kind)
    if (checkout / "recipes").is_dir():
        shutil.copytree(checkout / "recipes", root / "recipes")
    if (checkout / "results" / "regress" / "baselines.json").is_file():
        shutil.copy(checkout / "results" / "regress" / "baselines.json", root / "baselines.json")


def _sweep_case(root: Path) -> Case:
    from ..sweep import Grid, load_grid

    return Case([root / "sweep.yaml"], lambda: load_grid(root / "sweep.yaml"), lambda grid: isinstance(grid, Grid),
                text=True)


def _registry_case(root: Path) -> Case:
    from .. import registry

    def read():
        files = registry.folder_documents
        stages = [s for kind, folder in registry.STAGE_KINDS.items()
                  for s in registry.stages_in(files(root / "stages" / folder), kind).values()]
        return [*registry.backbones_in(files(root / "backbones")).values(),
                *registry.tasks_in(files(root / "tasks")).values(), *stages]

    return Case(sorted((root / "backbones").glob("*.yaml")) + sorted((root / "tasks").glob("*.yaml"))
                + sorted((root / "stages").rglob("*.yaml")), read, lambda specs: all(_typed(spec) for spec in specs),
                text=True)


def _recipe_case(root: Path) -> Case:
    from ..reproduce.recipe import Recipe, load

    files = sorted((root / "recipes").glob("*.yaml"))[:6]
    return Case(files, lambda: [load(path) for path in files], lambda recipes: all(isinstance(r, Recipe)
                                                                                    for r in recipes), text=True)


def _baselines_case(root: Path) -> Case:
    from ..regress.baselines import Baselines, read_baselines

    return Case([root / "baselines.json"], lambda: read_baselines(root / "baselines.json"),
                lambda baselines: isinstance(baselines, Baselines), text=True)


def _typed(spec) -> bool:
    """The fields the harness computes with hold values of their declared kinds."""
    from ..registry import BackboneSpec, StageSpec, is_number, is_whole

    if isinstance(spec, StageSpec):
        return all(isinstance(getattr(spec, k), str) for k in ("name", "kind", "entrypoint")) \
            and isinstance(spec.params, dict) and all(isinstance(f, str) for f in spec.features)
    if isinstance(spec, BackboneSpec):
        return (all(isinstance(getattr(spec, k), str) for k in ("name", "family", "builder", "arch"))
                and all(is_whole(getattr(spec, k)) and getattr(spec, k) >= (0 if k == "heads" else 1)
                        for k in ("patch_size", "embed_dim", "heads", "input_size"))
                and all(isinstance(getattr(spec, k), tuple) and len(getattr(spec, k)) == 3
                        and all(is_number(v) for v in getattr(spec, k)) for k in ("mean", "std"))
                and isinstance(spec.checkpoint, dict) and isinstance(spec.options, dict))
    return (isinstance(spec.name, str) and isinstance(spec.entrypoint, str) and isinstance(spec.params, dict)
            and isinstance(spec.features, tuple) and all(isinstance(f, str) for f in spec.features)
            and is_whole(spec.version))


TARGETS: dict[str, Target] = {t.name: t for t in [
    _dataset_target("folder", images=True),
    *(_dataset_target(name) for name in FORMATS),
    Target("checkpoint", "a PyTorch checkpoint in DINO's release layout, unwrapped and loaded", _build_checkpoints,
           _checkpoint_case("checkpoint.pth")),
    Target("safetensors", "a safetensors file, unwrapped and loaded", _build_checkpoints,
           _checkpoint_case("model.safetensors")),
    Target("cache", "feature and label cache files (must read back exactly, or be recomputed)", _build_run,
           _cache_case),
    Target("kept-values", "values kept by ctx.reuse (must read back exactly, or be recomputed)", _build_run,
           _kept_case),
    Target("samples", "panel samples beside the store (exactly as kept, or no panel)", _build_run, _samples_case),
    Target("store", "the SQLite results store, reported on", _build_run, _store_case),
    Target("sweep-yaml", "a sweep file", _build_yaml, _sweep_case),
    Target("registry-yaml", "backbone, task and stage registry files", _build_yaml, _registry_case),
    Target("recipe-yaml", "reproduce recipes (paper tables)", _build_yaml, _recipe_case),
    Target("baselines-json", "regression baselines", _build_yaml, _baselines_case),
]}
