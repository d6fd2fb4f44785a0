"""Data for calibration, validation and runs, in one low place: real images by default, random feeds, .npz files.

Sources, named by one string (``--data``):

* a folder with ``x1/`` and ``x2/`` subfolders: pairs matched by file name (stem);
* a folder of images: pairs drawn from it (two different crops of one image, seeded);
* a ``.csv`` manifest with columns ``x1,x2`` (paths relative to the manifest);
* an ``.npz`` file with ``x1``/``x2`` arrays (4-D: one feed; 5-D: several);
* ``shipped``: photos that scikit-image's wheel carries (a stereo pair among them), cropped into pairs;
* ``package.module:function``: a function returning an iterable of feed dicts;
* ``synthetic``: random data, only when asked for, and labelled as such in every report.

Images are decoded with Pillow, converted to each input's channels (1: grayscale, 3: RGB, 4: RGBA,
any other count: grayscale replicated; the count of converted images is reported), resized to each
of the target sizes (dynamic shapes deserve calibration at several resolutions) and normalised with a
configurable mean/std. Unreadable files are skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from xattn.errors import ArtifactError, BadInputError, DataError
from xattn.shapes import ShapeSet

Feed = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Two resolutions by default, x1 and x2 of different sizes in both.
DEFAULT_SIZES: tuple[dict[str, tuple[int, int]], ...] = (
    {"x1": (64, 64), "x2": (48, 80)},
    {"x1": (96, 96), "x2": (64, 64)},
)


@dataclass
class DataSettings:
    """How to turn a source into feeds. ``None`` means the default.

    Attributes:
        samples: image pairs (or feeds, for non-image sources) to use (default 64).
        seed: seed for shuffling, pair drawing and synthetic data (default 0).
        shuffle: shuffle the pairs before taking ``samples`` (default True).
        batch_size: pairs per feed (default 1).
        sizes: per resolution, ``{input: (height, width)}``; every pair is rendered at every size
            (default: :data:`DEFAULT_SIZES`, mapped onto the model's first two inputs).
        mean, std: per-channel normalisation after scaling pixels to [0, 1] (default ImageNet's).
        synthetic_shapes: shape sets for ``synthetic`` data (default: from ``sizes``).
    """

    samples: int = 64
    seed: int = 0
    shuffle: bool = True
    batch_size: int = 1
    sizes: Sequence[Mapping[str, tuple[int, int]]] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass
class CalibrationData:
    """Feeds plus what reports must say about them."""

    feeds: list[Feed]
    label: str
    synthetic: bool = False
    pairs: int = 0
    #: what ``pairs`` counts: image pairs, or samples (the first axis of an .npz)
    unit: str = "pairs"
    skipped: int = 0
    converted: int = 0
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def sha256(self) -> str:
        """Hash of every array (name, dtype, shape, bytes) in order: same data, same hash."""
        return feeds_digest(self.feeds)

    def split(self, holdout: float) -> tuple["CalibrationData", "CalibrationData"]:
        """(calibration, held-out): the last ``holdout`` share of feeds is held out (at least one)."""
        if not 0.0 < holdout < 1.0:
            raise DataError(f"holdout must be between 0 and 1, got {holdout}")
        cut = min(max(1, int(round(len(self.feeds) * (1.0 - holdout)))), len(self.feeds) - 1)
        if cut < 1:
            raise DataError(f"{self.label}: {len(self.feeds)} feed(s) cannot be split into calibration and held-out data",
                            hint="use more samples")
        first = CalibrationData(self.feeds[:cut], self.label, self.synthetic, notes=list(self.notes))
        second = CalibrationData(self.feeds[cut:], self.label + " (held out)", self.synthetic, notes=list(self.notes))
        return first, second

    def statistics(self) -> dict[str, dict[str, float]]:
        return input_statistics(self.feeds)

    def summary(self) -> str:
        parts = [f"{len(self.feeds)} feeds from {self.label}"]
        if self.pairs:
            parts.append(f"{self.pairs} {self.unit}")
        if self.skipped:
            parts.append(f"{self.skipped} unreadable files skipped")
        if self.converted:
            parts.append(f"{self.converted} images converted to the model's channels")
        parts.extend(self.notes)
        if self.synthetic:
            parts.append("SYNTHETIC random data: ranges may not fit real inputs")
        return ", ".join(parts)


# -- image pairs ---------------------------------------------------------------------------------

@dataclass
class _Pair:
    label: str
    first: Any   # a path or a PIL image
    second: Any
    box1: tuple[float, float, float, float] | None = None  # relative crop (left, top, right, bottom)
    box2: tuple[float, float, float, float] | None = None

def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_pairs(folder: Path, seed: int) -> tuple[list[_Pair], list[str]]:
    """Pairs from ``x1/`` + ``x2/`` subfolders (matched by stem), else drawn from one folder; and notes."""
    sub1, sub2 = folder / "x1", folder / "x2"
    if sub1.is_dir() and sub2.is_dir():
        first = {p.stem: p for p in _images_in(sub1)}
        second = {p.stem: p for p in _images_in(sub2)}
        unpaired = sorted(set(first) ^ set(second))
        paired = sorted(set(first) & set(second))
        if not paired:
            raise DataError(f"{folder}: x1/ and x2/ hold no pair of images with the same name "
                            f"({len(first)} in x1/, {len(second)} in x2/)",
                            hint="x1/ and x2/ must hold files with the same names")
        # An unpaired file is skipped and counted (one stray file should not stop a calibration run).
        notes = []
        if unpaired:
            shown = ", ".join(unpaired[:5]) + (f" and {len(unpaired) - 5} more" if len(unpaired) > 5 else "")
            notes.append(f"{len(unpaired)} file(s) without a partner in the other subfolder skipped: {shown}")
        return [_Pair(stem, first[stem], second[stem]) for stem in paired], notes
    images = _images_in(folder)
    if not images:
        raise DataError(f"{folder} holds no images", hint="give a folder of .png/.jpg files, or x1/ and x2/ subfolders")
    # One folder: each image gives a pair of two different, overlapping crops (a natural x1/x2 pair).
    rng = np.random.default_rng(seed)
    return [_Pair(p.name, p, p, *_crop_boxes(rng)) for p in images], []


def csv_pairs(manifest: Path) -> list[_Pair]:
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {manifest}: {exc}") from exc
    if not rows:
        raise DataError(f"manifest {manifest} has no rows")
    if not {"x1", "x2"} <= set(rows[0]):
        raise DataError(f"manifest {manifest} needs columns x1,x2; it has {', '.join(rows[0])}")
    base = manifest.parent
    return [_Pair(f"row {i + 1}", base / row["x1"], base / row["x2"]) for i, row in enumerate(rows)]


def shipped_photo_folder() -> Path:
    """scikit-image's bundled photos (its wheel carries about 25, a stereo pair among them)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        raise DataError("the shipped photos come with scikit-image, which is not installed",
                        hint="pip install 'xattn-deploy[data]', or give --data FOLDER")
    return Path(spec.origin).parent / "data"


def shipped_pairs(seed: int) -> list[_Pair]:
    """Real photo pairs: the motorcycle stereo pair (same crops, left/right views) and two crops of each photo."""
    folder = shipped_photo_folder()
    rng = np.random.default_rng(seed)
    pairs = []
    left, right = folder / "motorcycle_left.png", folder / "motorcycle_right.png"
    if left.is_file() and right.is_file():
        for i in range(4):  # the stereo pair gives true cross-view pairs: the same region seen twice
            box = _crop_box(rng, 0.35, 0.8)
            pairs.append(_Pair(f"motorcycle stereo {i}", left, right, box, box))
    for path in _images_in(folder):
        if path.name.startswith("motorcycle_") or "chessboard" in path.name or path.name.startswith("no_time"):
            continue
        pairs.append(_Pair(path.name, path, path, *_crop_boxes(rng)))
    return pairs


def _crop_box(rng, low: float, high: float) -> tuple[float, float, float, float]:
    w, h = rng.uniform(low, high, size=2)
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def _crop_boxes(rng):
    return _crop_box(rng, 0.4, 0.9), _crop_box(rng, 0.4, 0.9)


#: Pillow mode per channel count; any other count is grayscale replicated (and noted).
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class _ImageLoader:
    """Opens images once each, in the mode the input's channel count needs, counting what was
    converted or unreadable."""

    def __init__(self):
        self.cache: dict[tuple[Path, str], Any] = {}
        self.skipped: set[Path] = set()
        self.converted: set[Path] = set()

    def open(self, source, mode: str = "RGB"):
        from PIL import Image, UnidentifiedImageError

        if not isinstance(source, Path):
            return source if source is None or source.mode == mode else source.convert(mode)
        if (source, mode) in self.cache:
            return self.cache[(source, mode)]
        if source in self.skipped:
            return None
        try:
            with warnings.catch_warnings():
                # a decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS) is an error, counted as
                # unreadable, not a warning followed by gigabytes of decoding
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as handle:
                    if handle.format == "JPEG":
                        handle.draft(mode if mode in ("L", "RGB") else "RGB", (1024, 1024))   # decode large JPEGs reduced
                    handle.load()
                    image = handle
                    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                        # 16-bit (or 32-bit) data: scale to 8 bits; convert() would clip at 255
                        self.converted.add(source)
                        image = _scaled_to_8_bit(image).convert(mode)
                    elif image.mode != mode:
                        # Grayscale is replicated to three channels, colour becomes luminance for a
                        # 1-channel input, RGBA loses its alpha for RGB (composited on black).
                        self.converted.add(source)
                        image = image.convert(mode)
                    else:
                        image = image.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning):
            self.skipped.add(source)
            image = None
        self.cache[(source, mode)] = image
        return image


def _scaled_to_8_bit(image):
    """A 16/32-bit image as 8-bit grayscale, scaled by its type's full range (16-bit: /257), not clipped."""
    from PIL import Image

    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "I":
        scale = float(max(array.max(), 1)) if array.max() > 65535 else 65535.0
    else:   # "F": floats, taken as 0..1 when they fit, else by their maximum
        scale = 1.0 if array.max() <= 1.0 else float(array.max())
    return Image.fromarray(np.clip(array.astype(np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _render(image, box, size_hw: tuple[int, int], mean, std, channels: int = 3) -> np.ndarray:
    from PIL import Image

    if box is not None:
        w, h = image.size
        image = image.crop((int(box[0] * w), int(box[1] * h), max(int(box[2] * w), int(box[0] * w) + 1),
                            max(int(box[3] * h), int(box[1] * h) + 1)))
    height, width = size_hw
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0          # (H, W) or (H, W, C)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], channels, axis=2)      # 1 channel, or grayscale replicated to C
    array = (array - channel_values(mean, channels)) / channel_values(std, channels)
    return np.ascontiguousarray(array.transpose(2, 0, 1))           # (C, H, W)


def channel_values(values: Sequence[float], channels: int) -> np.ndarray:
    """Per-channel mean/std for ``channels``: given per channel, one value for all, or ImageNet's three
    averaged for a grayscale input (what timm does for 1-channel models)."""
    values = tuple(values)
    if len(values) == channels:
        return np.asarray(values, np.float32)
    if len(values) == 1:
        return np.full(channels, values[0], np.float32)
    if channels == 1 and len(values) == 3:
        return np.asarray([sum(values) / 3.0], np.float32)
    if channels == 4 and len(values) == 3:   # RGBA: alpha gets the RGB average
        return np.asarray([*values, sum(values) / 3.0], np.float32)
    raise DataError(f"--mean/--std give {len(values)} values for a {channels}-channel input",
                    hint=f"give {channels} values, or one for every channel")


def resolve_sizes(settings: DataSettings, names: Sequence[str]) -> list[dict[str, tuple[int, int]]]:
    """Target sizes keyed by the model's input names (the defaults are written for x1/x2)."""
    sizes = list(settings.sizes or DEFAULT_SIZES)
    result = []
    for size in sizes:
        if set(size) == set(names):
            result.append(dict(size))
        elif len(size) == len(names) and not settings.sizes:
            result.append({name: value for name, value in zip(names, size.values())})
        else:
            raise DataError(f"sizes name inputs {', '.join(size)} but the model has {', '.join(names)}")
    return result


def image_feeds(pairs: list[_Pair], names: Sequence[str], channels: Mapping[str, int], settings: DataSettings,
                label: str) -> CalibrationData:
    if len(names) != 2:
        raise DataError(f"image pairs feed two inputs; this model has {len(names)} ({', '.join(names)})",
                        hint="use .npz data or a package.module:function source")
    modes = {name: CHANNEL_MODES.get(channels[name], "L") for name in names}
    for name in names:   # a --mean/--std that fits no input's channels is refused before any image is decoded
        channel_values(settings.mean, channels[name])
        channel_values(settings.std, channels[name])
    if settings.samples < 1 or settings.batch_size < 1:
        raise DataError("samples and batch size must be at least 1")
    if settings.shuffle:
        order = np.random.default_rng(settings.seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order]
    loader = _ImageLoader()
    readable = [(pair, loader.open(pair.first, modes[names[0]]), loader.open(pair.second, modes[names[1]]))
                for pair in pairs]
    readable = [(pair, a, b) for pair, a, b in readable if a is not None and b is not None]
    if not readable:
        raise DataError(f"{label}: none of the {len(pairs)} image pairs could be read "
                        f"({len(loader.skipped)} unreadable files)", hint="check the files are images")
    # Fewer pairs than asked: crop-based pairs can make more with fresh (seeded) crops; pairs of
    # distinct files cannot, and the shortfall is noted rather than padded with repeats.
    usable = readable[: settings.samples]
    rng = np.random.default_rng(settings.seed + 1)
    index = len(usable)
    while len(usable) < settings.samples and any(p.box1 is not None for p, _, _ in readable):
        pair, first, second = readable[index % len(readable)]
        index += 1
        if pair.box1 is None:
            continue
        round_ = index // len(readable)
        boxes = (_crop_box(rng, 0.35, 0.8),) * 2 if pair.box1 == pair.box2 else _crop_boxes(rng)
        usable.append((_Pair(f"{pair.label} #{round_}", pair.first, pair.second, *boxes), first, second))
    sizes = resolve_sizes(settings, names)
    feeds = []
    for size in sizes:
        for start in range(0, len(usable), settings.batch_size):
            batch = usable[start:start + settings.batch_size]
            feed = {}
            for position, name in enumerate(names):
                arrays = [_render(img1 if position == 0 else img2, (pair.box1 if position == 0 else pair.box2),
                                  size[name], settings.mean, settings.std, channels[name])
                          for pair, img1, img2 in batch]
                feed[name] = np.stack(arrays)
            feeds.append(feed)
    if any(p.box1 is not None for p, _, _ in usable) and ", seed " not in label:
        label += f", seed {settings.seed}"   # crops depend on the seed: other seeds, other (held-out) samples
    data = CalibrationData(feeds, label, pairs=len(usable), skipped=len(loader.skipped),
                           converted=len(loader.converted))
    if len(usable) < settings.samples:
        data.notes.append(f"asked for {settings.samples} pairs, {len(usable)} available")
    odd = sorted({channels[n] for n in names if channels[n] not in CHANNEL_MODES})
    if odd:
        data.notes.append(f"images have no {'/'.join(map(str, odd))}-channel form: grayscale replicated to "
                          f"{'/'.join(map(str, odd))} channels")
    return data


# -- the dispatcher --------------------------------------------------------------------------------

def load_calibration_data(spec: str, names: Sequence[str], channels: Mapping[str, int],
                          settings: DataSettings | None = None) -> CalibrationData:
    """Feeds for a model with inputs ``names`` (and their ``channels``) from the source ``spec``."""
    settings = settings or DataSettings()
    names = list(names)
    if spec == "synthetic":
        return synthetic_data(names, channels, settings)
    if spec == "shipped":
        return image_feeds(shipped_pairs(settings.seed), names, channels, settings,
                           f"shipped photos (scikit-image), seed {settings.seed}")
    path = Path(spec)
    if path.suffix == ".npz":
        feeds = check_feeds(npz_samples(path, names, settings), channels, str(path))
        return CalibrationData(feeds, str(path), pairs=sum(next(iter(f.values())).shape[0] for f in feeds),
                               unit="samples")
    if path.suffix == ".csv":
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist")
        return image_feeds(csv_pairs(path), names, channels, settings, str(path))
    if path.is_dir():
        pairs, notes = folder_pairs(path, settings.seed)
        data = image_feeds(pairs, names, channels, settings, str(path))
        data.notes[:0] = notes
        return data
    if ":" in spec and not path.exists() and not os.path.sep in spec.split(":")[0]:
        return callable_data(spec, names, channels, settings)
    if not path.exists():
        raise DataError(f"data source {spec} does not exist",
                        hint="give a folder, a .csv manifest, an .npz file, 'shipped', 'synthetic' or pkg.mod:function")
    raise DataError(f"data source {spec} is not a folder, .csv, .npz, 'shipped', 'synthetic' or pkg.mod:function")


def model_inputs(model) -> tuple[list[str], dict[str, int]]:
    """Input names and channel counts of an ``onnx.ModelProto``: from its xattn record, else its graph."""
    from xattn.provenance import get_onnx_metadata

    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in graph_inputs]
    channels = get_onnx_metadata(model).get("inputs") or {
        i.name: i.type.tensor_type.shape.dim[1].dim_value for i in graph_inputs}
    return names, dict(channels)


def load_for_model(spec: str, model, settings: DataSettings | None = None) -> CalibrationData:
    """:func:`load_calibration_data` shaped for the inputs of ``model`` (an ``onnx.ModelProto``)."""
    from xattn.provenance import get_onnx_metadata

    names, channels = model_inputs(model)
    settings = fit_default_sizes(settings or DataSettings(), names, get_onnx_metadata(model))
    data = load_calibration_data(spec, names, channels, settings)
    check_feed_ranges(data, model)
    return data


def fit_default_sizes(settings: DataSettings, names: Sequence[str], record: Mapping[str, Any]) -> DataSettings:
    """The default image sizes clamped into the model's recorded height/width ranges (a model exported
    for at most 48x48 is calibrated at 48x48, not refused); sizes the user gave are kept as given."""
    import dataclasses

    from xattn.shapes import parse_shape_set

    if settings.sizes or not (record.get("min_shapes") and record.get("max_shapes")):
        return settings
    low, high = parse_shape_set(record["min_shapes"]), parse_shape_set(record["max_shapes"])
    sizes = []
    for size in resolve_sizes(settings, names):
        sizes.append({name: tuple(min(max(v, low[name][2 + i]), high[name][2 + i]) for i, v in enumerate(hw))
                      if name in low and len(low[name]) == 4 else hw for name, hw in size.items()})
    return dataclasses.replace(settings, sizes=sizes)


def check_feed_ranges(data: "CalibrationData", model) -> None:
    """Every feed within the dynamic ranges the model records (an out-of-range feed would reach ONNX
    Runtime, or calibrate shapes the artifact will never see)."""
    from xattn.provenance import get_onnx_metadata
    from xattn.shapes import format_shape_set, parse_shape_set

    record = get_onnx_metadata(model)
    if not (record.get("min_shapes") and record.get("max_shapes")):
        return
    low, high = parse_shape_set(record["min_shapes"]), parse_shape_set(record["max_shapes"])
    for index, feed in enumerate(data.feeds):
        for name, value in feed.items():
            if name in low and not all(a <= v <= b for v, a, b in zip(value.shape, low[name], high[name])):
                raise DataError(f"{data.label}, sample {index + 1}: input {name!r} has shape "
                                f"{'x'.join(map(str, value.shape))}, outside the model's range "
                                f"{format_shape_set({name: low[name]})} .. {format_shape_set({name: high[name]})}",
                                hint="resize the data (--resize), or export with wider --min/--max-shapes")


def synthetic_data(names: Sequence[str], channels: Mapping[str, int], settings: DataSettings) -> CalibrationData:
    sizes = resolve_sizes(settings, names)
    feeds = []
    for j, size in enumerate(sizes):
        shapes = {n: (settings.batch_size, channels[n], *size[n]) for n in names}
        feeds.extend(random_feed(shapes, seed=settings.seed * 7919 + j * 104729 + i) for i in range(settings.samples))
    return CalibrationData(feeds, "synthetic random normal data", synthetic=True)


def callable_data(spec: str, names: Sequence[str], channels: Mapping[str, int], settings: DataSettings) -> CalibrationData:
    from xattn.imports import import_object

    function: Callable[[], Iterable[Feed]] = import_object(spec, DataError, "data function")
    feeds = []
    for feed in function():
        if not isinstance(feed, Mapping):
            raise DataError(f"{spec} yielded a {type(feed).__name__}, expected a dict of input name -> array")
        feeds.append({k: np.asarray(v) for k, v in feed.items()})
        if len(feeds) >= settings.samples:
            break
    if not feeds:
        raise DataError(f"{spec} yielded no feeds")
    return CalibrationData(check_feeds(feeds, channels, spec), spec)


def check_feeds(feeds: list[Feed], channels: Mapping[str, int], label: str) -> list[Feed]:
    """Calibration data gets the checks inference inputs get, before any work: every input present,
    float (float64 is narrowed to float32; integers are refused: the data must be normalised),
    4-D ``(N, C, H, W)`` with the model's channels, one batch size across inputs, no NaN/Inf."""
    checked = []
    for index, feed in enumerate(feeds):
        where = f"{label}, sample {index + 1}"
        out = {}
        for name, expected in channels.items():
            value = feed.get(name)
            if value is None:
                raise DataError(f"{where} has no input {name!r}")
            value = np.asarray(value)
            if value.dtype.kind != "f":
                raise DataError(f"{where}: input {name!r} is {value.dtype}, not floating point",
                                hint="give normalised float32 arrays (images are normalised by --mean/--std)")
            if value.ndim != 4 or value.shape[1] != expected:
                raise DataError(f"{where}: input {name!r} has shape {value.shape}, expected (N, {expected}, H, W)")
            if not np.isfinite(value).all():
                raise DataError(f"{where}: input {name!r} holds NaN/Inf values", hint="clean the data")
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
        batches = {name: v.shape[0] for name, v in out.items()}
        if len(set(batches.values())) > 1:
            raise DataError(f"{where}: inputs have different batch sizes {batches}")
        checked.append(out)
    return checked


def npz_samples(path: Path, names: Sequence[str], settings: DataSettings) -> list[Feed]:
    """Calibration feeds from an .npz: the first axis of 4-D arrays counts samples (as the ecosystem
    reads it), batched by ``settings.batch_size``; 5-D arrays ``(feeds, N, C, H, W)`` are feeds already."""
    arrays = load_npz(path, list(names))
    ranks = {name: value.ndim for name, value in arrays.items()}
    if set(ranks.values()) == {4}:
        counts = {name: value.shape[0] for name, value in arrays.items()}
        if len(set(counts.values())) != 1:
            raise DataError(f"{path}: inputs hold different sample counts {counts}")
        total = min(next(iter(counts.values())), settings.samples)
        step = settings.batch_size
        return [{n: v[i:i + step] for n, v in arrays.items()} for i in range(0, total, step)]
    return npz_feeds(path, list(names))[: settings.samples]


# -- feeds: random inputs, .npz files, any source by name ---------------------------------------------

def random_feed(shapes: ShapeSet, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Standard-normal inputs, reproducible from ``seed`` and independent of dict order.

    Each input gets its own generator seeded from (seed, name), so adding an input does not change
    the values of the others.
    """
    feed = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def feeds_digest(feeds) -> str:
    """sha256 over every array (name, dtype, shape, bytes) of ``feeds``, in order: same inputs, same digest."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def load_npz(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read arrays from an .npz; with ``names``, require exactly those (extra arrays are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"input file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise ArtifactError(f"cannot read {path} as .npz: {' '.join(str(exc).split())[:160]}") from exc
    if names is not None:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise BadInputError(f"{path} has no array named {', '.join(map(repr, missing))}; "
                                f"it holds {', '.join(map(repr, arrays)) or 'nothing'}",
                                hint="save with np.savez(path, x1=..., x2=...)")
        arrays = {n: arrays[n] for n in names}
    return arrays


def npz_feeds(path: str | Path, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz: 4-D arrays are one feed; 5-D arrays ``(samples, N, C, H, W)`` are several."""
    arrays = load_npz(path, names)
    ranks = {name: value.ndim for name, value in arrays.items()}
    if set(ranks.values()) == {4}:
        return [{n: np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v for n, v in arrays.items()}]
    if set(ranks.values()) == {5}:
        counts = {name: value.shape[0] for name, value in arrays.items()}
        if len(set(counts.values())) != 1:
            raise BadInputError(f"{path}: inputs hold different sample counts {counts}")
        count = next(iter(counts.values()))
        if count == 0:
            raise BadInputError(f"{path}: the arrays hold no samples (first axis 0)")
        return [{n: np.ascontiguousarray(v[i]) for n, v in arrays.items()} for i in range(count)]
    raise BadInputError(f"{path}: arrays must be 4-D (N, C, H, W) or 5-D (samples, N, C, H, W), got ranks {ranks}")


def load_data(spec: str | Path, names: list[str], model_record: dict | None = None,
              settings=None) -> tuple[list[dict[str, np.ndarray]], str]:
    """Real inputs from any calibration data source (see :mod:`xattn.data`): ``(feeds, label)``."""

    channels = dict((model_record or {}).get("inputs") or {n: 3 for n in names})
    settings = fit_default_sizes(settings or DataSettings(), names, model_record or {})
    data = load_calibration_data(str(spec), names, channels, settings)
    return data.feeds, data.label


# -- input statistics ------------------------------------------------------------------------------

def input_statistics(feeds) -> dict[str, dict[str, float]]:
    """Per input: mean, standard deviation, min and max over every feed (float64 running sums, so memory
    stays flat). INT8 ranges fit the data they were calibrated on; these say what that data looked like."""
    sums: dict[str, list[float]] = {}
    for feed in feeds:
        for name, value in feed.items():
            array = np.asarray(value, dtype=np.float64)
            if array.size == 0:
                continue
            entry = sums.setdefault(name, [0.0, 0.0, 0.0, math.inf, -math.inf])
            entry[0] += array.size
            entry[1] += float(array.sum())
            entry[2] += float(np.square(array).sum())
            entry[3] = min(entry[3], float(array.min()))
            entry[4] = max(entry[4], float(array.max()))
    stats = {}
    for name, (count, total, squares, low, high) in sorted(sums.items()):
        mean = total / count
        stats[name] = {"mean": mean, "std": math.sqrt(max(squares / count - mean * mean, 0.0)), "min": low, "max": high}
    return stats


def format_statistics(stats: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{name} mean {s['mean']:.3g}, std {s['std']:.3g}, range [{s['min']:.3g}, {s['max']:.3g}]"
                     for name, s in stats.items())


def statistics_mismatch(calibrated: dict, validated: dict) -> list[str]:
    """Inputs whose validation data is unlike the calibration data: the means differ by more than the
    calibration data's standard deviation, or the spreads by more than 2x either way (INT8 ranges then clip
    or waste levels on what they are judged on). Values are read as data; malformed entries are skipped."""
    found = []
    for name, cal in (calibrated or {}).items():
        val = (validated or {}).get(name)
        try:
            c_mean, c_std, v_mean, v_std = (float(cal["mean"]), float(cal["std"]), float(val["mean"]), float(val["std"]))
        except (TypeError, KeyError, ValueError):
            continue
        if not all(map(math.isfinite, (c_mean, c_std, v_mean, v_std))) or c_std <= 0 or v_std <= 0:
            continue
        if abs(v_mean - c_mean) > c_std or not 0.5 <= v_std / c_std <= 2.0:
            found.append(f"{name}: calibrated on mean {c_mean:.3g} std {c_std:.3g}, judged on mean {v_mean:.3g} "
                         f"std {v_std:.3g}")
    return found
