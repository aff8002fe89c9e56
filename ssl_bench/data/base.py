"""SegDataset: the one interface every dataset reader implements.

A reader indexes its files once (``_index``) and decodes one image / label on demand, so opening a
dataset is cheap and memory stays flat. Labels come back as int64 at the original resolution with
``-1`` = ignore, whatever the on-disk convention (255 void, 0 boundary, colour codes ...).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

import numpy as np
from PIL import Image

from ssl_bench.errors import UserError
from ssl_bench.integrity import regular_file

IGNORE = -1
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image and its ground-truth file (``label`` is None for readers that synthesise labels)."""

    id: str
    image: Path
    label: Path | None


def label_lut(mapping: dict[int, int] | Sequence[int], size: int = 256) -> np.ndarray:
    """A lookup table raw value -> class id (int64, every unmapped value -> IGNORE).

    ``mapping`` is either {raw: class} or a sequence whose position is the raw value.
    """
    lut = np.full(size, IGNORE, dtype=np.int64)
    items = mapping.items() if isinstance(mapping, dict) else enumerate(mapping)
    for raw, cls in items:
        lut[raw] = cls
    return lut


def bitwise_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved): distinct, stable colours for any class count."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def display_palette(palette: np.ndarray | None, n: int) -> np.ndarray:
    """(n, 3) uint8 colours for drawing label maps: the dataset's own palette where it has one for
    every class, with repeated colours (e.g. synthetic classes told apart only by texture) shifted
    towards white or black so every class is visible; else a deterministic fallback (the VOC colour
    map without its black, which VOC uses for background)."""
    palette = np.asarray(palette if palette is not None else np.zeros((0, 3)), dtype=np.float64)
    if palette.ndim != 2 or palette.shape != (n, 3):
        return bitwise_palette(n + 1)[1:]
    out, seen = palette.copy(), {}
    for i, colour in enumerate(palette):
        repeat = seen.setdefault(tuple(colour), 0)
        seen[tuple(colour)] += 1
        if repeat:
            target = 255.0 if colour.mean() < 128 else 0.0
            out[i] = colour + (target - colour) * min(0.45 * repeat, 0.9)
    return np.rint(out).astype(np.uint8)


def apply_lut(raw: np.ndarray, lut: np.ndarray, what: str) -> np.ndarray:
    """Map a single-channel label array through ``lut``; values beyond the table become IGNORE."""
    if raw.ndim != 2:
        raise UserError(f"{what}: expected a single-channel label image, got shape {raw.shape} -- "
                        f"labels must be grey/palette PNGs of class ids")
    if raw.dtype.kind not in "ui":
        raw = raw.astype(np.int64)
    if raw.size and (raw.min() < 0 or raw.max() >= len(lut)):
        inside = (raw >= 0) & (raw < len(lut))
        return np.where(inside, lut[np.clip(raw, 0, len(lut) - 1)], IGNORE)
    return lut[raw]


def pair_by_stem(image_dir: Path, mask_dir: Path, what: str, mask_exts: Iterable[str] = (".png",)) -> list[Sample]:
    """Images of ``image_dir`` paired with the mask of the same stem in ``mask_dir`` (sorted by stem).

    An image without a mask is an error, not a silent skip: an evaluation on a quietly smaller set
    would not be comparable.
    """
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in tuple(mask_exts)}
    images = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=lambda p: p.stem)
    twice = sorted(stem for stem, n in Counter(p.stem for p in images).items() if n > 1)
    if twice:  # two images would be scored against one mask, under one id
        raise UserError(f"{what}: several images named {twice[0]}.* in {image_dir} -- keep one file per stem")
    unmatched = [p.name for p in images if p.stem not in masks]
    if unmatched:
        kinds = "/".join(mask_exts)
        other = sorted({p.suffix for p in mask_dir.iterdir() if p.stem == Path(unmatched[0]).stem} - set(mask_exts))
        hint = f" (found {Path(unmatched[0]).stem}{other[0]}: masks must be {kinds}, lossless)" if other else ""
        raise UserError(
            f"{what}: {len(unmatched)} image(s) in {image_dir} have no mask in {mask_dir} (e.g. {unmatched[0]})"
            f"{hint} -- give every image a {kinds} mask with the same file stem"
        )
    return [Sample(p.stem, p, masks[p.stem]) for p in images]


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a text file of a dataset (split lists, class names), stripped; a file that is not
    UTF-8 text, or not a regular file, is one clear line."""
    try:
        text = regular_file(path, what).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 text file -- restore it from the dataset's release") from None
    if "\x00" in text:  # no file name holds one (pathlib would raise ValueError on it)
        raise UserError(f"{what} {path} holds NUL bytes: it is damaged -- restore it from the dataset's release")
    return [line.strip() for line in text.splitlines() if line.strip()]


def require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{what} not found at {path} -- {hint}")
    return path


class SegDataset:
    """Base reader. Subclasses set the class attributes and implement ``_index`` and ``decode_label``.

    Class attributes double as the registry's documentation (``ssl-bench datasets`` can list them):
    ``default_root`` says what a data root must look like, ``splits`` which splits exist and
    ``default_split`` the split benchmarks evaluate on.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    default_root: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    default_split: ClassVar[str] = "val"
    num_classes: int
    class_names: list[str]
    palette: np.ndarray  # (num_classes, 3) uint8
    # The class of pixels in no object class (VOC's "background"), or None: region filters that find background
    # (ACSeg's foreground detection) act on datasets that have one, and paint it with this class.
    background_class: ClassVar[int | None] = None
    prompt_names: ClassVar[list[str] | None] = None  # class names as words for text prompts (None: class_names)
    # Reader options that change the images themselves, hence the features: part of the feature cache key
    # (every option is part of the label cache key).
    image_options: ClassVar[tuple[str, ...]] = ()
    has_labels: ClassVar[bool] = True  # False: images only (methods run, predictions are kept, no metrics)

    def __init__(self, root: str | Path | None, split: str):
        self._check_split(split)
        if root is None:
            raise UserError(f"{self.title} needs a data root -- pass --data-root pointing at {self.default_root}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserError(f"{self.title} not found at {self.root} -- pass --data-root pointing at {self.default_root}")
        self.split = split
        self.samples: list[Sample] = self._index()
        if not self.samples:
            raise UserError(f"{self.title} split {split!r} at {self.root} has no images -- check the data root")

    def check_files(self) -> None:
        """Every image and its label are there before any work: a missing one found after an hour of
        extraction costs the hour. One listing per folder, not a stat per file (COCO has 100k files)."""
        listings: dict[Path, set[str]] = {}

        def present(path: Path) -> bool:
            if path.parent not in listings:
                try:
                    listings[path.parent] = {entry.name for entry in os.scandir(path.parent)}
                except OSError:  # no such folder (or unreadable): every file in it is missing
                    listings[path.parent] = set()
            return path.name in listings[path.parent]

        for kind, paths in (("image", [s.image for s in self.samples]),
                            ("label", [s.label for s in self.samples if s.label is not None])):
            missing = [p for p in paths if not present(p)]
            if missing:
                raise UserError(f"{self.title} split {self.split!r}: {len(missing)} of {len(paths)} {kind} files "
                                f"missing (e.g. {missing[0]}) -- the data root {self.root} is incomplete: restore "
                                f"them, or point --data-root at {self.default_root}")

    @classmethod
    def _check_split(cls, split: str) -> None:
        if split not in cls.splits:
            raise UserError(f"{cls.title} has no split {split!r} -- choose one of: {', '.join(cls.splits)}")

    # --- subclass hooks -------------------------------------------------------------------------
    def _index(self) -> list[Sample]:
        raise NotImplementedError

    def decode_label(self, raw: np.ndarray) -> np.ndarray:
        """Raw label file content -> int64 class ids, -1 = ignore."""
        raise NotImplementedError

    # --- public interface -----------------------------------------------------------------------
    @property
    def options(self) -> dict:
        """Reader options as opened, defaults included (``open_dataset`` records them)."""
        return getattr(self, "_options", {})

    @property
    def identity(self) -> dict:
        """What tells this data apart beyond its name, options and ids: nothing for a named benchmark (its
        copies are interchangeable, so moving one keeps its cache and results); see FolderDataset."""
        return {}

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    @property
    def ids_sha(self) -> str:
        """Digest of the image list: another list (``limit=``, another split file) is another run and cache entry."""
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, root={str(getattr(self, 'root', None))!r})"

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB at its original size."""
        return self._read(self.samples[i].image, lambda im: im.convert("RGB"))

    def load_label(self, i: int) -> np.ndarray:
        """Ground truth of image ``i``: int64 (H, W) at the original size, -1 = ignore."""
        return self.decode_label(self._read(self.samples[i].label, np.asarray))

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i`` read from the file header only (PIL opens lazily)."""
        return self._read(self.samples[i].image, lambda im: im.size)

    def _read(self, path: Path | None, use: Callable[[Image.Image], Any]) -> Any:
        """``use(image)`` on the opened file: PIL decodes lazily, so a truncated file fails inside ``use``,
        and that too must name the file."""
        try:
            with Image.open(regular_file(path, f"{self.title}:")) as im:  # a FIFO would block the run forever
                return use(im)
        except FileNotFoundError:
            raise UserError(
                f"{self.title}: missing file {path} -- the data root {self.root} is incomplete; "
                f"re-download or point --data-root at {self.default_root}"
            ) from None
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 -- PIL raises OSError, but also SyntaxError, ValueError, struct.error
            # ... on damaged files (found by ssl-bench fuzz): every one means the same to the user
            raise UserError(f"{self.title}: cannot read {path} ({type(err).__name__}) -- the file is damaged or not "
                            f"an image; replace or remove it") from None
