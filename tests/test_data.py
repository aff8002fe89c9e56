"""Dataset readers and the input protocol, on the real shared data where it is present."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_bench.data import DATASETS, Protocol, SegDataset, dataset_options, open_dataset
from ssl_bench.data.cocostuff import COARSE_NAMES, FINE_TO_COARSE, CocoStuff27, read_curated_list
from ssl_bench.data.suim import SUIM6_NAMES, SUIM8_NAMES
from ssl_bench.errors import UserError

SHARED = Path(os.environ.get("SSL_BENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared data {path} absent (set SSL_BENCH_SHARED_DATA to the shared/data folder)")
    return path


def raw(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def check_sample(ds: SegDataset, i: int) -> np.ndarray:
    """Image / label / header size agree; labels are int64 ids in range or -1."""
    image, label = ds.load_image(i), ds.load_label(i)
    assert image.mode == "RGB"
    assert ds.image_size(i) == image.size == (label.shape[1], label.shape[0])
    assert label.dtype == np.int64
    assert label.min() >= -1 and label.max() < ds.num_classes
    return label


def test_registry_attributes():
    for name, cls in DATASETS.items():
        assert cls.default_root and cls.default_split in cls.splits, name
        if name != "folder":
            assert len(cls.class_names) == cls.num_classes == len(cls.palette), name
            assert cls.palette.dtype == np.uint8 and cls.palette.shape[1] == 3, name


# --- CamVid ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("split, count", [("val", 101), ("train", 367)])
def test_camvid_counts_and_ignore(split, count):
    ds = open_dataset("camvid", shared("camvid"), split)
    assert len(ds) == count and ds.num_classes == 11
    # The SegNet list prefix /SegNet/CamVid/ is mapped onto the root.
    assert ds.samples[0].image == shared("camvid") / split / f"{ds.ids[0]}.png"
    for i in (0, len(ds) - 1):
        label = check_sample(ds, i)
        ids = raw(ds.samples[i].label).astype(np.int64)
        assert np.array_equal(label, np.where(ids == 11, -1, ids))


def test_camvid_missing_split_names_present_ones():
    with pytest.raises(UserError, match=r"test\.txt.*--split train or val"):
        open_dataset("camvid", shared("camvid"), "test")


# --- SUIM -----------------------------------------------------------------------------------------
def test_suim_8_and_6_classes():
    ds8 = open_dataset("suim8", shared("suim"), "test")
    ds6 = open_dataset("suim", shared("suim"), "test")
    assert len(ds8) == len(ds6) == 8
    assert ds8.class_names == SUIM8_NAMES and ds6.class_names == SUIM6_NAMES and ds6.name == "suim"
    seen = set()
    for i in range(len(ds8)):
        l8, l6 = check_sample(ds8, i), check_sample(ds6, i)
        assert l8.min() >= 0  # SUIM labels every pixel
        rgb = raw(ds8.samples[i].label)[..., :3] > 127
        assert np.array_equal(l8, 4 * rgb[..., 0] + 2 * rgb[..., 1] + rgb[..., 2])
        # BW (0), PF (2), SR (7) merge into background (5); the others keep their identity.
        expected = np.array([5, 0, 5, 4, 1, 3, 2, 5])[l8]
        assert np.array_equal(l6, expected)
        seen.update(np.unique(l8).tolist())
    assert len(seen) >= 5
    assert open_dataset("suim", shared("suim"), "test", classes=8).num_classes == 8


def test_suim_official_layout(tmp_path):
    for folder in ("train_val", "TEST"):
        (tmp_path / folder / "images").mkdir(parents=True)
        (tmp_path / folder / "masks").mkdir()
        Image.new("RGB", (8, 6), (10, 20, 30)).save(tmp_path / folder / "images" / "a.jpg")
        Image.new("RGB", (8, 6), (255, 255, 0)).save(tmp_path / folder / "masks" / "a.bmp")  # yellow = fish
    ds = open_dataset("suim", tmp_path, "train")
    assert len(ds) == 1 and (ds.load_label(0) == 2).all()
    assert (open_dataset("suim8", tmp_path, "test").load_label(0) == 6).all()


# --- VOC, Cityscapes, Potsdam ---------------------------------------------------------------------
def test_voc2012_flat_samples():
    ds = open_dataset("voc2012", shared("voc2012"), "val")
    assert len(ds) == 14 and ds.num_classes == 21
    for i in range(len(ds)):
        label = check_sample(ds, i)
        ids = raw(ds.samples[i].label).astype(np.int64)
        assert np.array_equal(label, np.where(ids == 255, -1, ids))
    assert (label == -1).any()


def test_cityscapes27_label_mapping():
    ds = open_dataset("cityscapes27", shared("fixtures/cityscapes"), "val")
    assert len(ds) == 1 and ds.ids == ["frankfurt_000000_000294"]
    label = check_sample(ds, 0)
    ids = raw(ds.samples[0].label).astype(np.int64)
    assert np.array_equal(label, np.where((ids >= 7) & (ids <= 33), ids - 7, -1))
    assert ds.class_names[label[ids == 7][0]] == "road"
    assert (label == -1).any() and (ids < 7).any()


def test_potsdam3_merge():
    ds = open_dataset("potsdam3", shared("fixtures/potsdam"), "val")
    assert len(ds) == 1
    label = check_sample(ds, 0)
    ids = raw(ds.samples[0].label)
    merge = {0: -1, 1: 0, 5: 0, 2: 1, 6: 1, 3: 2, 4: 2}  # boundary, roads+cars, buildings+clutter, vegetation
    for fine, coarse in merge.items():
        assert (label[ids == fine] == coarse).all()
    assert set(np.unique(label)) == {-1, 0, 1, 2}


def test_potsdam3_iic_mat_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="the IIC/STEGO .mat layout needs scipy")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "labelled_test.txt").write_text("t1\n")
    img = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)  # RGB + IR
    scipy_io.savemat(tmp_path / "imgs" / "t1.mat", {"img": img})
    scipy_io.savemat(tmp_path / "gt" / "t1.mat", {"gt": np.array([[0, 1, 2, 3], [4, 5, 255, 0], [1, 1, 1, 1]], np.uint8)})
    ds = open_dataset("potsdam3", tmp_path, "val")
    assert ds.image_size(0) == (4, 3) and np.array_equal(np.asarray(ds.load_image(0)), img[..., :3])
    assert ds.load_label(0).tolist() == [[0, 1, 2, 2], [0, 1, -1, 0], [1, 1, 1, 1]]
    with pytest.raises(UserError, match=r"labelled_train\.txt"):
        open_dataset("potsdam3", tmp_path, "train")
    (tmp_path / "gt" / "t1.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(UserError, match=r"cannot read 'gt' from .*t1\.mat .* the file is damaged"):
        ds.load_label(0)


# --- COCO-Stuff-27 --------------------------------------------------------------------------------
def test_cocostuff_fine_to_coarse_table():
    assert len(FINE_TO_COARSE) == 182 and len(COARSE_NAMES) == 27 == len(set(COARSE_NAMES))
    counts = Counter(FINE_TO_COARSE)
    # Fine ids per coarse class in STEGO's table (things include COCO's 11 unused ids).
    assert [counts[c] for c in range(27)] == [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8,
                                             2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9, 2, 6, 5, 5]
    assert FINE_TO_COARSE[:91] == sorted(FINE_TO_COARSE[:91], key=lambda c: [9, 11, 8, 7, 6, 10, 5, 2, 3, 0, 1, 4].index(c))
    assert max(FINE_TO_COARSE[:91]) < 12 and min(FINE_TO_COARSE[91:]) >= 12  # things then stuff
    named = {0: "person", 2: "vehicle", 16: "animal", 71: "electronic", 105: "sky", 119: "water",
             148: "ground", 156: "sky", 168: "plant", 172: "wall", 180: "window", 181: "solid"}
    for fine, coarse in named.items():
        assert COARSE_NAMES[FINE_TO_COARSE[fine]].startswith(coarse), fine


def test_cocostuff_curated_lists():
    root = shared("cocostuff")
    val, train = read_curated_list(root, "val"), read_curated_list(root, "train")
    assert (len(train), len(val)) == (49629, 2175)
    assert val[:2] == ["000000000139", "000000000724"] and all(len(i) == 12 for i in val)
    with pytest.raises(UserError, match=r"images missing: expected .*images/val2017/000000000139\.jpg -- download"):
        open_dataset("cocostuff27", root, "val")


def test_cocostuff_reader(tmp_path):
    (tmp_path / "curated" / "val2017").mkdir(parents=True)
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000001\n000000000002\n")
    for sub in ("images", "annotations"):
        (tmp_path / sub / "val2017").mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(tmp_path / "images" / "val2017" / "000000000001.jpg")
    Image.fromarray(np.array([[0, 168, 255, 200], [91, 181, 156, 1]], np.uint8)).save(
        tmp_path / "annotations" / "val2017" / "000000000001.png")
    with pytest.raises(UserError, match=r"1 of 2 image files missing \(e\.g\. .*000000000002\.jpg\)"):
        open_dataset("cocostuff27", tmp_path, "val")  # at open, not when the extraction reaches it
    ds = open_dataset("cocostuff27", tmp_path, "val", limit=1)
    assert isinstance(ds, CocoStuff27) and ds.ids == ["000000000001"]
    names = [[COARSE_NAMES[c] if c >= 0 else None for c in row] for row in ds.load_label(0).tolist()]
    assert names == [["person-things", "plant-stuff", None, None], ["textile-stuff", "solid-stuff", "sky-stuff", "vehicle-things"]]
    with pytest.raises(UserError, match=r"curated"):
        open_dataset("cocostuff27", tmp_path, "train")


# --- folder ---------------------------------------------------------------------------------------
def make_folder(root: Path, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\nground\n\ntree\n")
    for stem in ("b", "a"):
        Image.new("RGB", (mask.shape[1], mask.shape[0]), (1, 2, 3)).save(root / "images" / f"{stem}.jpg")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")


def test_folder_dataset(tmp_path):
    make_folder(tmp_path, np.array([[0, 1, 2], [255, 2, 0]]))
    ds = open_dataset("folder", tmp_path, "val")
    assert ds.class_names == ["sky", "ground", "tree"] and ds.num_classes == 3 and ds.palette.shape == (3, 3)
    assert ds.ids == ["a", "b"]
    assert check_sample(ds, 0).tolist() == [[0, 1, 2], [-1, 2, 0]]
    with pytest.raises(UserError, match=r"mask value 255 is not a class id .* nor the ignore value 0"):
        open_dataset("folder", tmp_path, "val", ignore=0).load_label(0)
    with pytest.raises(UserError, match=r"--split val"):
        open_dataset("folder", tmp_path, "train")


def test_folder_rejects_unknown_ids_and_unpaired_images(tmp_path):
    make_folder(tmp_path, np.array([[0, 7]]))
    with pytest.raises(UserError, match=r"a\.png.*mask value 7 is not a class id"):
        open_dataset("folder", tmp_path, "val").load_label(0)
    Image.new("RGB", (2, 1)).save(tmp_path / "images" / "c.png")
    with pytest.raises(UserError, match=r"1 image\(s\) .* have no mask .*c\.png"):
        open_dataset("folder", tmp_path, "val")


def test_truncated_files_are_one_line_naming_them(tmp_path):
    make_folder(tmp_path, np.array([[0, 1, 2], [255, 2, 0]]))
    (tmp_path / "images" / "a.jpg").unlink()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = (tmp_path / "images" / "a.png").read_bytes()
    (tmp_path / "images" / "a.png").write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not
    ds = open_dataset("folder", tmp_path, "val")
    assert ds.image_size(0) == (64, 64)
    with pytest.raises(UserError, match=r"cannot read .*a\.png \(OSError\) -- the file is damaged"):
        ds.load_image(0)


# --- synthetic ------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_exact():
    a, b = open_dataset("synthetic", None, "val"), open_dataset("synthetic", None, "val", seed=0)
    assert len(a) == 24 and a.ids[0] == "val_0000"
    for i in (0, 5):
        assert np.array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i)))
        assert np.array_equal(a.load_label(i), b.load_label(i))
    train = open_dataset("synthetic", None, "train")
    assert not np.array_equal(np.asarray(train.load_image(0)), np.asarray(a.load_image(0)))
    other_seed = open_dataset("synthetic", None, "val", seed=1)
    assert not np.array_equal(other_seed.load_label(0), a.load_label(0))

    # Exact labels: every class region has its class statistics; all classes occur across the split.
    counts = np.zeros(a.num_classes, int)
    for i in range(len(a)):
        label = check_sample(a, i)
        assert label.min() >= 0 and a.image_size(i) == (192, 192)
        counts += np.bincount(label.ravel(), minlength=a.num_classes)
    assert (counts > 0).all()
    image, label = np.asarray(a.load_image(0)).astype(float), a.load_label(0)
    for c in np.unique(label):
        mean = image[label == c].mean(0)
        assert np.abs(mean - a.palette[c]).max() < 20  # the class colour (texture is zero-mean)


def test_synthetic_classes_need_patch_statistics():
    """Colour pairs differ only in texture: patch std separates them where the pixel mean cannot."""
    ds = open_dataset("synthetic", None, "train", n=6)
    std = {c: [] for c in range(ds.num_classes)}
    for i in range(len(ds)):
        image, label = np.asarray(ds.load_image(i)).astype(float), ds.load_label(i)
        for c in np.unique(label):
            std[c].append(image[label == c].std(0).mean())
    smooth, textured = max(np.mean(std[0]), np.mean(std[3])), min(np.mean(std[c]) for c in (1, 2, 4) if std[c])
    assert textured > 2 * smooth
    assert np.array_equal(ds.palette[0], ds.palette[1]) and np.array_equal(ds.palette[3], ds.palette[4])


# --- protocol -------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", [8, 14, 16])
def test_protocol_output_sizes(patch):
    center = Protocol().for_patch_size(patch)
    side = 322 if patch == 14 else 320
    assert center.resize == side
    assert center.output_size(480, 360, patch) == (side, side)
    assert center.output_size(128, 256, patch) == (side, side)
    none = Protocol(crop="none").for_patch_size(patch)
    h, w = none.output_size(480, 360, patch)  # 4:3 -> short side `side`, long side cropped to the grid
    assert h == side and w % patch == 0 and int(side * 480 / 360) - patch < w <= int(side * 480 / 360)
    h, w = none.output_size(256, 128, patch)
    assert h == side and w == side * 2
    # A non-default resize is kept; the crop still makes the grid exact.
    odd = Protocol(resize=300).for_patch_size(patch)
    assert odd.resize == 300 and odd.output_size(300, 300, patch) == (300 - 300 % patch,) * 2


def test_protocol_apply_image_and_label():
    proto = Protocol()
    image = Image.new("RGB", (480, 360), (10, 200, 30))
    out = proto.apply_image(image, 16)
    assert out.dtype == np.uint8 and out.shape == (320, 320, 3) and (out == (10, 200, 30)).all()
    label = np.random.default_rng(0).integers(-1, 11, (360, 480))
    small = proto.apply_label(label, 16)
    assert small.dtype == np.int64 and small.shape == (320, 320)
    assert set(np.unique(small)) <= set(np.unique(label)) and (small == -1).any()
    assert proto.input_dict() == {"resize": 320, "crop": "center", "image_interp": "bilinear", "label_interp": "nearest"}
    assert proto.as_dict() == {**proto.input_dict(), "overclustering": "majority", "absent_classes": "zero-if-predicted"}
    ident = Protocol(resize=360, crop="none")
    assert np.array_equal(ident.apply_label(label, 8), label)  # 360x480 already fits the /8 grid: untouched
    assert np.array_equal(ident.apply_label(label, 16), label[4:356])  # 360 -> 352 rows, centred


def test_protocol_keeps_image_and_label_aligned():
    ds = open_dataset("synthetic", None, "val", n=2)
    for proto in (Protocol(resize=130), Protocol(resize=250, crop="none")):
        image = proto.apply_image(ds.load_image(1), 14).astype(float)
        label = proto.apply_label(ds.load_label(1), 14)
        assert image.shape[:2] == label.shape == proto.output_size(192, 192, 14)
        for c in np.unique(label):
            assert np.abs(image[label == c].mean(0) - ds.palette[c]).max() < 25


def test_protocol_rejects_bad_values():
    for kwargs in ({"crop": "random"}, {"image_interp": "cubic"}, {"label_interp": "bilinear"}, {"resize": 0}):
        with pytest.raises(UserError, match="--|choose|nearest"):
            Protocol(**kwargs)


# --- errors ---------------------------------------------------------------------------------------
def _listed_layout(root: Path, name: str) -> tuple[str, Path]:
    """A two-image copy of a reader whose image list names its files (nothing pairs them by stem): the
    dataset name and the label file of the second image."""
    grey = lambda path: Image.fromarray(np.zeros((6, 8), np.uint8)).save(path)  # noqa: E731
    rgb = lambda path: Image.new("RGB", (8, 6)).save(path)  # noqa: E731
    if name == "camvid":
        for sub in ("val", "valannot"):
            (root / sub).mkdir()
        (root / "val.txt").write_text("".join(f"/SegNet/CamVid/val/{i}.png /SegNet/CamVid/valannot/{i}.png\n"
                                              for i in "ab"))
        files = [(rgb, root / "val" / f"{i}.png") for i in "ab"] + [(grey, root / "valannot" / f"{i}.png") for i in "ab"]
    elif name == "voc2012":
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / sub).mkdir(parents=True)
        (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
        files = [(rgb, root / "JPEGImages" / f"{i}.jpg") for i in "ab"]
        files += [(grey, root / "SegmentationClass" / f"{i}.png") for i in "ab"]
    else:  # cocostuff27
        for sub in ("curated", "images", "annotations"):
            (root / sub / "val2017").mkdir(parents=True)
        (root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("a\nb\n")
        files = [(rgb, root / "images/val2017" / f"{i}.jpg") for i in "ab"]
        files += [(grey, root / "annotations/val2017" / f"{i}.png") for i in "ab"]
    for write, path in files:
        write(path)
    return name, files[-1][1]


@pytest.mark.parametrize("name", ["camvid", "voc2012", "cocostuff27"])
def test_a_missing_label_is_found_when_the_dataset_opens(tmp_path, name):
    """Deleting one label file used to surface as a FileNotFoundError traceback after the whole extraction."""
    name, label = _listed_layout(tmp_path, name)
    assert len(open_dataset(name, tmp_path, "val")) == 2
    label.unlink()
    with pytest.raises(UserError, match=rf"split 'val': 1 of 2 label files missing \(e\.g\. .*{label.name}\) -- "
                                        rf"the data root .* is incomplete"):
        open_dataset(name, tmp_path, "val")
    assert len(open_dataset(name, tmp_path, "val", limit=1)) == 1  # the images used are what must be whole


def test_user_errors_name_the_problem_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    for name in ("camvid", "suim", "voc2012", "cityscapes27", "cocostuff27", "potsdam3", "folder"):
        with pytest.raises(UserError) as err:
            open_dataset(name, missing, DATASETS[name].default_split)
        msg = str(err.value)
        assert str(missing) in msg and " -- " in msg and "\n" not in msg, msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"CamVid not found at .*empty: expected .*val\.txt -- pass --data-root"):
        open_dataset("camvid", tmp_path / "empty", "val")
    with pytest.raises(UserError, match="unknown dataset 'kitti' -- choose one of: camvid"):
        open_dataset("kitti", tmp_path, "val")
    with pytest.raises(UserError, match="unknown dataset 'camvd' -- did you mean camvid"):
        open_dataset("camvd", tmp_path, "val")
    with pytest.raises(UserError, match="has no split 'dev' -- choose one of"):
        open_dataset("synthetic", None, "dev")
    with pytest.raises(UserError, match=r"unknown option\(s\) colour .* valid options \(with their defaults\): classes=6"):
        open_dataset("suim", tmp_path, "test", colour=1)
    with pytest.raises(UserError, match="needs a data root -- pass --data-root"):
        open_dataset("voc2012", None, "val")
    assert dataset_options(DATASETS["synthetic"]) == {"n": 24, "size": 192, "seed": 0}


# --- MATLAB files (Potsdam, IIC layout) -----------------------------------------------------------
def test_mat_reader_gives_what_scipy_gives_and_never_crashes_on_damage(tmp_path):
    from scipy.io import loadmat, savemat

    from ssl_bench.data.matfile import MatError, load_numeric

    rng = np.random.default_rng(0)
    values = {"img": rng.integers(0, 255, (3, 4, 4), dtype=np.uint8), "gt": rng.integers(0, 6, (3, 4)).astype(np.uint8),
              "d": rng.standard_normal((2, 2)), "i": np.arange(6, dtype=np.int16).reshape(2, 3), "text": "skipped"}
    for compressed in (False, True):
        path = tmp_path / f"a{compressed}.mat"
        savemat(path, values, do_compression=compressed)
        ours, theirs = load_numeric(path), loadmat(path)
        assert sorted(ours) == ["d", "gt", "i", "img"]
        assert all(ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]) for k in ours)
        good = path.read_bytes()
        for position in range(len(good)):  # scipy's compiled reader crashed the process on some of these
            for damaged in (good[:position], good[:position] + bytes([good[position] ^ 0x40]) + good[position + 1:]):
                path.write_bytes(damaged)
                try:
                    assert all(isinstance(a, np.ndarray) for a in load_numeric(path).values())
                except MatError:
                    pass
