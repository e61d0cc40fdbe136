"""CLIP image preprocessing, with numpy and Pillow only (no torch, no transformers).

Why in models/: it is the checkpoint's own input contract (`preprocessor_config.json`), used by the model-folder
loader (`vtprune.models.loading.ModelFolder`) for the PyTorch reference and by the runtime for a bundle, so it
sits in the lowest layer both may import. It imports neither torch nor transformers (and `vtprune.models` has an
empty `__init__`), so the runtime importing it still runs without torch (tests/runtime/test_torch_free.py and the
layers contract in tests/test_layers.py check both).

It reads a model folder's or a bundle's `preprocessor_config.json` (the `CLIPImageProcessor` format) and reproduces, step by step,
the PIL backend of `transformers` 5.x (`CLIPImageProcessorPil`, which `CLIPImageProcessor.from_dict` returns when
torchvision is absent): convert to RGB (alpha composited on white) -> resize the shortest edge with Pillow ->
center crop -> rescale (float64, then float32) -> normalise (float32). The result equals it within 1e-5
(tests/models/test_preprocess.py); the torchvision "fast" backend resizes with its own kernels and differs from
both by up to a few grey levels.

`load_image` is the only way the runtime opens an image file: it reads the declared size from the header and
refuses a decompression bomb before any pixel is decoded.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vtprune.errors import UserError, read_json

# 8192 x 8192: 192 MB as RGB uint8, far above any input a 336-px vision tower needs.
MAX_IMAGE_PIXELS = 8192 * 8192
EXPECTED_IMAGE = "expected an image file (PNG, JPEG, ...)"
# The formats opened, each one whose header gives the size before any pixel is decoded. Left out on purpose:
# containers that decode an embedded image inside Image.open (ICO and ICNS hold whole PNGs, whose size the
# directory may misstate), and rare formats nobody feeds a vision model.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
MAX_SIDE = 8192  # the largest resize or crop side a preprocessor config may ask for (a 336-px tower needs 336)

# Pillow's resampling filters by their integer codes, as `preprocessor_config.json` stores them.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# CLIPImageProcessor's class defaults: a config that omits a key gets these, as in transformers.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """The fields of a CLIPImageProcessor config that change the pixels.

    Exactly one of `shortest_edge` (resize the shorter side, keep the aspect ratio) and `resize_hw`
    (resize to a fixed (height, width)) is set when `do_resize` is on.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    resample: int = 3
    do_center_crop: bool = True
    crop_hw: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """The (height, width) every image comes out at, or None when it depends on the image."""
        if self.do_center_crop:
            return self.crop_hw
        if self.do_resize and self.resize_hw is not None:
            return self.resize_hw
        return None

    @classmethod
    def from_dict(cls, d: dict, where: str = "preprocessor_config.json") -> PreprocessConfig:
        """Parse and check a CLIPImageProcessor config dict; a bad field is a UserError naming `where`."""
        if not isinstance(d, dict):
            raise UserError(where, f"expected a JSON object (CLIPImageProcessor config), got {type(d).__name__}")
        default = cls()
        flags = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            value = d.get(key, getattr(default, key))
            if value is None:  # transformers treats an explicit null as "use the class default"
                value = getattr(default, key)
            if not isinstance(value, bool):
                raise UserError(where, f"expected `{key}` to be true or false, got {value!r}")
            flags[key] = value

        shortest_edge, resize_hw = _parse_size(d.get("size", {"shortest_edge": 224}), where)
        crop_hw = _parse_crop_size(d.get("crop_size", {"height": 224, "width": 224}), where)

        resample = d.get("resample", 3)
        if isinstance(resample, bool) or resample not in RESAMPLE_NAMES:
            raise UserError(where, f"expected `resample` to be a Pillow filter code 0-5 (bicubic = 3), got {resample!r}")

        rescale_factor = d.get("rescale_factor", 1 / 255)
        if not _is_finite_number(rescale_factor):
            raise UserError(where, f"expected `rescale_factor` to be a finite number, got {rescale_factor!r}")

        image_mean = _parse_triple(d.get("image_mean", CLIP_MEAN), "image_mean", where)
        image_std = _parse_triple(d.get("image_std", CLIP_STD), "image_std", where)
        if any(s == 0 for s in image_std):
            raise UserError(where, f"expected `image_std` to have no zero entry, got {list(image_std)}")

        return cls(
            shortest_edge=shortest_edge,
            resize_hw=resize_hw,
            resample=int(resample),
            crop_hw=crop_hw,
            rescale_factor=float(rescale_factor),
            image_mean=image_mean,
            image_std=image_std,
            **flags,
        )

    @classmethod
    def from_model_folder(cls, folder: str | Path) -> PreprocessConfig:
        """A model folder's preprocessing: `preprocessor_config.json`, or in the layout transformers 5's processors
        save, the `image_processor` object inside `processor_config.json`."""
        folder = Path(folder)
        if (folder / "preprocessor_config.json").is_file() or not (folder / "processor_config.json").is_file():
            return cls.from_file(folder / "preprocessor_config.json")
        return cls.from_dict(image_processor_dict(folder), where=str(folder / "processor_config.json"))

    @classmethod
    def from_file(cls, path: str | Path) -> PreprocessConfig:
        d = read_json(path, "a preprocessor_config.json (the image preprocessing)", "preprocessor config")
        return cls.from_dict(d, where=str(path))


def image_processor_dict(folder: Path) -> dict:
    """The `image_processor` object nested in a transformers 5 `processor_config.json`."""
    path = folder / "processor_config.json"
    data = read_json(path, "a processor_config.json", "processor config")
    nested = data.get("image_processor") if isinstance(data, dict) else None
    if not isinstance(nested, dict):
        raise UserError(str(path), "expected an `image_processor` object (the layout transformers 5 saves), "
                                   "or a preprocessor_config.json beside it")
    return nested


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(x) -> bool:
    """A side length: a positive int no larger than MAX_SIDE (a crop of 100000 would allocate tens of GiB)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_SIDE


def _parse_size(size, where: str) -> tuple[int | None, tuple[int, int] | None]:
    """`size` as transformers reads it for CLIP: an int is the shortest edge; a pair is (height, width)."""
    if _positive_int(size):
        return size, None
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(v) for v in size):
        return None, (size[0], size[1])
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"} and _positive_int(size["shortest_edge"]):
            return size["shortest_edge"], None
        if set(size) == {"height", "width"} and _positive_int(size["height"]) and _positive_int(size["width"]):
            return None, (size["height"], size["width"])
    raise UserError(
        where, f'expected `size` to be {{"shortest_edge": N}} or {{"height": H, "width": W}} with positive ints up to {MAX_SIDE}, got {size!r}'
    )


def _parse_crop_size(crop, where: str) -> tuple[int, int]:
    if _positive_int(crop):
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2 and all(_positive_int(v) for v in crop):
        return crop[0], crop[1]
    if isinstance(crop, dict) and set(crop) == {"height", "width"} and all(_positive_int(v) for v in crop.values()):
        return crop["height"], crop["width"]
    raise UserError(where, f'expected `crop_size` to be {{"height": H, "width": W}} with positive ints up to {MAX_SIDE}, got {crop!r}')


def _parse_triple(value, key: str, where: str) -> tuple[float, float, float]:
    if _is_finite_number(value):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_finite_number(v) for v in value):
        return tuple(float(v) for v in value)
    raise UserError(where, f"expected `{key}` to be 3 finite numbers (one per RGB channel), got {value!r}")


# ----------------------------------------------------------------------------------------------- loading


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file safely: the declared size is checked against `max_pixels` before decoding.

    Returns the decoded image in its own mode (RGB conversion belongs to `preprocess`, as in transformers), turned
    upright by its EXIF orientation like `transformers.image_utils.load_image`. Anything that is not a readable
    image, including a truncated one, is a UserError naming the file.
    """
    where = str(path)
    path = Path(path)
    if not path.exists():
        raise UserError(where, f"no such file; {EXPECTED_IMAGE}")
    if not path.is_file():
        raise UserError(where, f"{EXPECTED_IMAGE}: this is a directory or a special file")
    try:
        if path.stat().st_size == 0:
            raise UserError(where, f"{EXPECTED_IMAGE}: the file is empty (0 bytes)")
        with warnings.catch_warnings():
            # Pillow's bomb warning (an image inside a container, a frame larger than the header said) is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:  # reads the header only, for these formats
                width, height = im.size
                if width * height > max_pixels:
                    raise UserError(
                        where,
                        f"{EXPECTED_IMAGE} of at most {max_pixels:,} pixels: the header declares "
                        f"{width} x {height} = {width * height:,} pixels (refused before decoding; a decompression bomb?)",
                    )
                im.load()  # decode now, so a truncated file fails here rather than later
                if im.mode == "F" and not np.isfinite(np.asarray(im)).all():  # a float TIFF can hold NaN / Inf
                    n_bad = int((~np.isfinite(np.asarray(im))).sum())
                    raise UserError(where, f"{EXPECTED_IMAGE} with finite pixel values: found {n_bad} NaN or Inf")
                return ImageOps.exif_transpose(im)  # a decoded copy, usable after the file is closed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's own limits
        raise UserError(where, f"{EXPECTED_IMAGE} of at most {max_pixels:,} pixels: refused before decoding ({e})") from None
    except UnidentifiedImageError:
        raise UserError(where, f"{EXPECTED_IMAGE}: not a format Pillow recognises among those vtprune opens "
                               f"({', '.join(IMAGE_FORMATS)})") from None
    except PermissionError:
        raise UserError(where, f"{EXPECTED_IMAGE}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # Pillow reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream", ...).
        raise UserError(where, f"{EXPECTED_IMAGE}: cannot decode it ({e or type(e).__name__})") from None


# ----------------------------------------------------------------------------------------- preprocessing


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion exactly as transformers' `convert_to_rgb`: transparency composited on white, else convert.

    Note: Pillow converts 16-bit grayscale (I;16) by clipping at 255, not by scaling, so a 16-bit image whose
    values use the full 0-65535 range comes out nearly white, in transformers as here.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_hw(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """Output (height, width) of the resize step (transformers' `get_resize_output_image_size`, torchvision's rule)."""
    if config.resize_hw is not None:
        return config.resize_hw
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Crop the center of an [H, W, C] array; a side shorter than the crop is zero-padded around the image."""
    h, w = image.shape[:2]
    ch, cw = crop_hw
    if ch > h or cw > w:  # pad first (transformers documents this, but its code returns the image unpadded)
        new_h, new_w = max(h, ch), max(w, cw)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded = np.zeros((new_h, new_w) + image.shape[2:], dtype=image.dtype)  # [H', W', C]
        padded[top : top + h, left : left + w] = image
        image, h, w = padded, new_h, new_w
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]  # [ch, cw, C]


def preprocess(image: Image.Image, config: PreprocessConfig, where: str = "image") -> np.ndarray:
    """A Pillow image -> `pixel_values` float32 [1, 3, H, W], as CLIPImageProcessor computes them.

    An extreme aspect ratio is refused (naming `where`) before the resize: a 1 x 8192 image resized to a
    shortest edge of 336 would be 336 x 2.75M pixels.
    """
    if config.do_resize:
        h, w = resize_hw(image.height, image.width, config)
        if h * w > MAX_IMAGE_PIXELS:
            raise UserError(where, f"{EXPECTED_IMAGE} of a less extreme shape: resizing its {image.width} x {image.height} "
                                   f"pixels would make {w} x {h} = {w * h:,} (at most {MAX_IMAGE_PIXELS:,})")
    if config.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise UserError(
            "preprocessor_config.json",
            f"expected `do_convert_rgb: true` to accept a {image.mode} image (only RGB images pass without conversion)",
        )
    if config.do_resize:
        h, w = resize_hw(image.height, image.width, config)
        image = image.resize((w, h), resample=config.resample)
    return _finish(np.asarray(image), config)


def preprocess_array(array: np.ndarray, config: PreprocessConfig, where: str = "pixel array") -> np.ndarray:
    """A raw pixel array -> `pixel_values` float32 [1, 3, H, W].

    `array` is [H, W] (grey) or [H, W, 3] (RGB), values in [0, 255] of any numeric dtype (fractions within [0, 1]
    are refused rather than guessed at); they are rounded to uint8 and go through the same steps as an image. For uint8 and integer-valued float arrays this is what
    transformers computes for the same array. NaN, Inf, out-of-range values and other shapes are a UserError
    naming `where`.
    """
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)) or array.dtype == bool:
        raise UserError(where, f"expected numeric pixel values, got dtype {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise UserError(where, f"expected pixels shaped [H, W] or [H, W, 3], got {list(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_bad = int((~np.isfinite(array)).sum())
        raise UserError(where, f"expected finite pixel values, found {n_bad} NaN or Inf")
    lo, hi = array.min(), array.max()
    if lo < 0 or hi > 255:
        raise UserError(where, f"expected pixel values in [0, 255], got [{lo}, {hi}]")
    if np.issubdtype(array.dtype, np.floating) and hi <= 1 and not np.array_equal(array, np.rint(array)):
        raise UserError(where, f"expected pixel values in [0, 255], got fractions in [{lo}, {hi}]: scale them by 255")
    rgb = np.rint(array).astype(np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)  # [H, W, 3]
    return preprocess(Image.fromarray(rgb), config, where)  # uint8 [H, W, 3] -> an RGB image


def _finish(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Crop, rescale and normalise a resized uint8 [H, W, 3] array, in transformers' dtypes and order."""
    pixels = rgb
    if config.do_center_crop:
        pixels = center_crop(pixels, config.crop_hw)  # [h, w, 3]
    if config.do_rescale:
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        pixels = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)  # [3]
        std = np.asarray(config.image_std, dtype=np.float32)  # [3]
        pixels = (pixels - mean) / std  # [h, w, 3]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)  # [1, 3, h, w]


def preprocess_file(path: str | Path, config: PreprocessConfig, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """`load_image` then `preprocess`: the runtime's path from an image file to `pixel_values` [1, 3, H, W]."""
    return preprocess(load_image(path, max_pixels=max_pixels), config, str(path))
