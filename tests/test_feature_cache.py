"""The feature cache: one extraction, float16 memmaps, variable image sizes, resume after interruption."""

import numpy as np
import pytest
from PIL import Image

from ssl_bench import registry
from ssl_bench.data import open_dataset
from ssl_bench.data.base import SegDataset
from ssl_bench.errors import UserError
from ssl_bench.data.protocol import Protocol
from ssl_bench.features import FeatureCache
from ssl_bench.models import build_backbone, resolve


class ArrayDataset(SegDataset):
    """Images held in memory; sizes may differ."""

    name = "arrays"
    title = "in-memory test images"

    def __init__(self, images):
        self.images, self.split, self.num_classes = images, "val", 2

    @property
    def ids(self):
        return [f"img{i}" for i in range(len(self.images))]

    def __len__(self):
        return len(self.images)

    def load_image(self, i):
        return Image.fromarray(self.images[i])

    def image_size(self, i):
        return self.images[i].shape[1], self.images[i].shape[0]


class CountingBackbone:
    """Wraps a backbone and counts forward passes (the cache must not run one on a hit)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.spec, self.patch_size = inner.spec, inner.patch_size

    def extract(self, x, kinds):
        self.calls += 1
        return self.inner.extract(x, kinds)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def vit():
    spec = registry.backbone("dino-vits16")
    return build_backbone(spec, resolve(spec, "random"), 0)


def images(n, sizes=((48, 64),)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def test_cached_features_equal_direct_extraction(tmp_path, vit):
    ds = ArrayDataset(images(5))
    protocol = Protocol(resize=32, crop="none")
    counting = CountingBackbone(vit)
    stores = FeatureCache(tmp_path).ensure(counting, "random:0", ds, protocol, ["patch", "key", "cls", "attn"],
                                           batch_size=2, workers=0)
    assert counting.calls == 3
    x = vit.normalize(np.stack([protocol.apply_image(ds.load_image(i), 16) for i in range(5)]))
    direct = vit.extract(x, {"patch", "key", "cls", "attn"})
    assert stores["patch"].flat.dtype == np.float16
    for i in range(5):
        np.testing.assert_allclose(stores["patch"][i], direct["patch"][i].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(stores["key"][i], direct["key"][i].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(stores["cls"][i], direct["cls"][i].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(stores["attn"][i], direct["attn"][i].numpy(), atol=1e-3)
    # a second call is a pure cache hit
    again = CountingBackbone(vit)
    FeatureCache(tmp_path).ensure(again, "random:0", ds, protocol, ["patch", "cls"], workers=0)
    assert again.calls == 0


def test_variable_sizes_are_stored_flat(tmp_path, vit):
    ds = ArrayDataset(images(4, sizes=((48, 64), (64, 48), (32, 96))))
    stores = FeatureCache(tmp_path).ensure(vit, "random:0", ds, Protocol(resize=32, crop="none"), ["patch"],
                                           batch_size=4, workers=0)
    fs = stores["patch"]
    assert [fs.grid(i) for i in range(4)] == [(2, 2), (2, 2), (2, 6), (2, 2)]
    assert len(fs.flat) == fs.offsets[-1] == 4 + 4 + 12 + 4
    assert fs[2].shape == (2, 6, 384)


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path, vit):
    ds = ArrayDataset(images(6))
    protocol = Protocol(resize=32, crop="none")
    full = FeatureCache(tmp_path / "full").ensure(vit, "random:0", ds, protocol, ["patch"], batch_size=1, workers=0)

    def dies_after_three(iterable, **_):
        for n, item in enumerate(iterable):
            if n == 3:
                raise KeyboardInterrupt
            yield item

    cache = FeatureCache(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        cache.ensure(vit, "random:0", ds, protocol, ["patch"], progress=dies_after_three, batch_size=1, workers=0)
    key = cache.key(vit.spec.name, "random:0", ds, protocol)
    assert cache.images_done(key, ["patch"]) == 3 and cache.images_done(key, ["patch", "cls"]) == 0  # the plan says so
    counting = CountingBackbone(vit)
    resumed = cache.ensure(counting, "random:0", ds, protocol, ["patch"], batch_size=1, workers=0)
    assert counting.calls == 3  # only the images not committed before the interruption
    np.testing.assert_array_equal(np.asarray(resumed["patch"].flat), np.asarray(full["patch"].flat))


def test_new_kind_extends_an_existing_entry(tmp_path, vit):
    ds = ArrayDataset(images(2))
    protocol = Protocol(resize=32, crop="none")
    cache = FeatureCache(tmp_path)
    cache.ensure(vit, "random:0", ds, protocol, ["patch"], workers=0)
    counting = CountingBackbone(vit)
    stores = cache.ensure(counting, "random:0", ds, protocol, ["patch", "value"], batch_size=1, workers=0)
    assert counting.calls == 2 and stores["value"][0].shape == (2, 2, 384)


class LabelledArrays(ArrayDataset):
    """In-memory images with labels; counts label decodes."""

    def __init__(self, images, labels):
        super().__init__(images)
        self.labels, self.decoded = labels, 0

    def load_label(self, i):
        self.decoded += 1
        return self.labels[i].copy()


def test_labels_are_decoded_once_per_dataset_and_protocol(tmp_path):
    rng = np.random.default_rng(0)
    imgs = images(3, sizes=((48, 64), (64, 48), (40, 40)))
    ds = LabelledArrays(imgs, [rng.integers(-1, 5, im.shape[:2]) for im in imgs])
    protocol = Protocol(resize=32, crop="none")
    store = FeatureCache(tmp_path).labels.ensure(ds, protocol, 16)
    assert ds.decoded == 3 and store.flat.dtype == np.int16
    for i in range(3):
        expected = protocol.apply_label(ds.labels[i], 16)
        assert store[i].dtype == np.int64 and np.array_equal(store[i], expected)
    again = FeatureCache(tmp_path).labels.ensure(ds, protocol, 16)  # another runner, same cache
    assert ds.decoded == 3 and np.array_equal(again[2], store[2])
    FeatureCache(tmp_path).labels.ensure(ds, Protocol(resize=48, crop="none"), 16)  # another protocol
    assert ds.decoded == 6


def test_a_label_that_is_not_the_size_of_its_image_is_one_clear_error(tmp_path):
    imgs = images(2)
    ds = LabelledArrays(imgs, [np.zeros((48, 64), np.int64), np.zeros((10, 40), np.int64)])
    with pytest.raises(UserError, match=r"img1: the label is 40x10 but its image is 64x48"):
        FeatureCache(tmp_path).labels.ensure(ds, Protocol(resize=32, crop="none"), 16)
    assert not list(tmp_path.glob("_labels/*/*/labels.json"))  # nothing half-written is ever read


def test_cache_keys_follow_the_dataset_options_that_change_the_data(tmp_path):
    cache, protocol = FeatureCache(tmp_path), Protocol()
    default, seed0, seed1 = (open_dataset("synthetic", None, "val", **o) for o in ({}, {"seed": 0}, {"seed": 1}))
    assert cache.key("b", "w", default, protocol) == cache.key("b", "w", seed0, protocol)
    assert cache.key("b", "w", seed0, protocol) != cache.key("b", "w", seed1, protocol)
    labels = [cache.labels.ensure(ds, protocol, 16) for ds in (seed0, seed1)]
    assert not np.array_equal(labels[0][0], labels[1][0])


def test_a_corrected_label_file_is_decoded_again(tmp_path):
    import os

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "x.png")
    cache, protocol = FeatureCache(tmp_path / "cache"), Protocol(resize=32)
    assert (cache.labels.ensure(open_dataset("folder", root, "val"), protocol, 16)[0] == 0).all()
    Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "masks" / "x.png")  # the annotation is fixed
    os.utime(root / "masks" / "x.png", ns=(1, 1))  # even a file with an older time stamp
    assert (cache.labels.ensure(open_dataset("folder", root, "val"), protocol, 16)[0] == 1).all()


def _damage(path, how: str) -> None:
    """Damage a cache file as a full disk, a killed copy or a bad sector would: cut it in half, empty it, or
    replace bytes in the middle of its data with finite garbage of the same type."""
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif path.suffix == ".json":  # a digit changed: still valid JSON, other numbers
        digit = next(i for i in range(len(raw) // 2, len(raw)) if raw[i:i + 1].isdigit())
        path.write_bytes(raw[:digit] + bytes([ord("0") + (raw[digit] - ord("0") + 3) % 10]) + raw[digit + 1:])
    else:  # finite values in the middle of the data: a float16 0.5 ... or class 1 (int16)
        middle = len(raw) * 3 // 4 // 2 * 2
        path.write_bytes(raw[:middle] + b"\x00\x38\x01\x00" * 4 + raw[middle + 16:])


@pytest.mark.parametrize("name", ["meta.json", "patch.npy", "patch.crc32", "patch.progress.json", "labels.npy",
                                  "labels.json"])
def test_a_damaged_cache_file_is_recomputed_with_one_warning_never_used(runner, name):
    import warnings

    from ssl_bench.runner import RunConfig

    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 4),),
                    protocol=Protocol(resize=64))
    first = runner.run(cfg).record
    path = next(runner.cache.root.rglob(name))
    for how in ("truncated", "emptied", "garbage"):
        _damage(path, how)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = runner.run(cfg, force=True).record  # the same configuration hash: it must get the same numbers
        assert again["metrics"] == first["metrics"], (name, how)
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and f"cache entry {path.parent} is damaged" in said[0], (how, said)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # repaired: no more warnings
            assert runner.run(cfg, force=True).record["metrics"] == first["metrics"]
