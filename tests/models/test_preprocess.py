"""Runtime image preprocessing: parity with transformers' CLIPImageProcessor, hand-computed cases, safe loading.

Oracle: `transformers.CLIPImageProcessor.from_dict(config)`. Without torchvision (as here) it is the PIL backend
(`CLIPImageProcessorPil`); with torchvision it would be the "fast" torch backend, whose resize kernel differs from
Pillow's, so the parity tests skip rather than compare against it.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vtprune.errors import UserError
from vtprune.models.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    MAX_IMAGE_PIXELS,
    PreprocessConfig,
    center_crop,
    load_image,
    preprocess,
    preprocess_array,
    preprocess_file,
    resize_hw,
)

TOL = 1e-5

LLAVA = {  # llava-hf/llava-1.5-7b-hf preprocessor_config.json
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(CLIP_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(CLIP_STD),
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
CONFIGS = {
    "llava-336": LLAVA,
    "small-nonsquare-crop": {**LLAVA, "size": {"shortest_edge": 24}, "crop_size": {"height": 20, "width": 14}},
    "fixed-size-bilinear-no-crop": {**LLAVA, "size": {"height": 30, "width": 21}, "resample": 2, "do_center_crop": False},
    "legacy-int-sizes": {**LLAVA, "size": 32, "crop_size": 28, "resample": 1},
    "no-rescale-custom-norm": {**LLAVA, "size": {"shortest_edge": 20}, "crop_size": {"height": 20, "width": 20},
                               "do_rescale": False, "image_mean": [127.5, 120.0, 110.0], "image_std": [64.0, 60.0, 70.0]},
    "defaults-only": {},
}


def clip_processor(config: dict):
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "falling back to CLIPImageProcessorPil" notice
    processor = transformers.CLIPImageProcessor.from_dict(config)
    if type(processor).__name__ != "CLIPImageProcessorPil":
        pytest.skip(f"transformers gave {type(processor).__name__}; the runtime mirrors the PIL backend")
    return processor


def reference(config: dict, image) -> np.ndarray:
    return clip_processor(config)(image, return_tensors="np")["pixel_values"]  # [1, 3, H, W]


def assert_close(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, f"max abs difference {diff:.3g} > {TOL}"


def textured(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Noise plus gradients and a bright square: structure for the resampling filters, not just noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 // max(w - 1, 1) + y * 127 // max(h - 1, 1)) % 256
    img = (base[..., None] + rng.integers(0, 60, (h, w, channels))) % 256
    img[h // 4 : h // 2, w // 3 : w // 2] = 250
    return img.astype(np.uint8)  # [h, w, C]


def make_image(mode: str, h: int = 45, w: int = 71) -> Image.Image:
    rgb = Image.fromarray(textured(h, w, 3))
    if mode in ("RGB", "L", "CMYK", "1"):
        return rgb.convert(mode)
    if mode == "RGBA":
        return Image.merge("RGBA", (*rgb.split(), Image.fromarray(textured(h, w, 1, seed=1)[..., 0])))
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), Image.fromarray(textured(h, w, 1, seed=2)[..., 0])))
    if mode == "P":
        return rgb.quantize(colors=37)
    if mode == "P+transparency":
        p = rgb.quantize(colors=37)
        p.info["transparency"] = 3
        return p
    if mode == "I;16-low":  # 16-bit values within 0..255: Pillow's conversion keeps them
        return Image.fromarray(textured(h, w, 1)[..., 0].astype(np.uint16))
    if mode == "I;16-full":  # 16-bit values over the full range: Pillow clips at 255 (see to_rgb's note)
        return Image.fromarray(textured(h, w, 1)[..., 0].astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(textured(h, w, 1)[..., 0].astype(np.int32) * 3 - 100)
    if mode == "F":
        return Image.fromarray(textured(h, w, 1)[..., 0].astype(np.float32) * 1.3 - 20.5)
    raise ValueError(mode)


MODES = ["RGB", "L", "1", "I;16-low", "I;16-full", "I", "F", "RGBA", "LA", "P", "P+transparency", "CMYK"]


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config_name", ["llava-336", "small-nonsquare-crop"])
def test_modes_match_transformers(mode, config_name):
    config = CONFIGS[config_name]
    image = make_image(mode)
    assert image.mode == mode.split("-")[0].split("+")[0]
    assert_close(preprocess(image, PreprocessConfig.from_dict(config)), reference(config, image))


@pytest.mark.parametrize("hw", [(336, 336), (480, 640), (640, 480), (37, 53), (9, 500), (500, 9), (5, 5), (1, 1)])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_sizes_and_configs_match_transformers(hw, config_name):
    if config_name == "llava-336" and min(hw) < 16:
        pytest.skip("extreme aspect at 336 px: an 18,666-px long edge, slow and covered by the small configs")
    config = CONFIGS[config_name]
    image = Image.fromarray(textured(*hw, 3, seed=hw[0]))
    assert_close(preprocess(image, PreprocessConfig.from_dict(config)), reference(config, image))


@pytest.mark.parametrize(
    "fmt, mode",
    [("PNG", "RGB"), ("PNG", "L"), ("PNG", "I;16-full"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P+transparency"),
     ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("TIFF", "CMYK"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGBA")],
)
def test_files_match_transformers(tmp_path, fmt, mode):
    """From a file on disk, as the runtime gets it: load_image + preprocess == processor(Image.open(file))."""
    path = tmp_path / f"img.{fmt.lower()}"
    make_image(mode, 61, 47).save(path, fmt)
    config = CONFIGS["small-nonsquare-crop"]
    with Image.open(path) as opened:
        ref = reference(config, opened)
    assert_close(preprocess_file(path, PreprocessConfig.from_dict(config)), ref)
    assert_close(preprocess(load_image(path), PreprocessConfig.from_dict(LLAVA)), reference(LLAVA, Image.open(path)))


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int64])
def test_arrays_match_transformers(dtype):
    """Integer-valued [H, W, 3] arrays: the same pixels as transformers computes from the same array."""
    array = textured(29, 43, 3).astype(dtype)
    config = CONFIGS["small-nonsquare-crop"]
    assert_close(preprocess_array(array, PreprocessConfig.from_dict(config)), reference(config, array))


# ------------------------------------------------------------------------------ hand-computed cases


def test_constant_image_gives_the_normalised_constant():
    """Any resize of a constant image is that constant: every output pixel is (v / 255 - mean_c) / std_c."""
    v = 200
    out = preprocess(Image.new("RGB", (123, 77), (v, v, v)), PreprocessConfig.from_dict(LLAVA))
    assert out.shape == (1, 3, 336, 336)
    expected = (v / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [3]
    np.testing.assert_allclose(out[0].reshape(3, -1), np.repeat(expected[:, None], 336 * 336, axis=1), atol=1e-6)


def test_rgba_is_composited_on_white():
    """A fully transparent pixel becomes white, a half-transparent red one a pink, as transformers does."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 128)  # top half: red at alpha 128; bottom half: transparent black
    config = PreprocessConfig.from_dict({"do_resize": False, "do_center_crop": False, "do_normalize": False})
    out = preprocess(Image.fromarray(rgba), config)[0] * 255  # [3, 4, 4]
    np.testing.assert_allclose(out[:, 2:], 255, atol=1e-4)  # transparent -> white
    np.testing.assert_allclose(out[0, :2], 255, atol=1e-4)
    np.testing.assert_allclose(out[1:, :2], 127, atol=1.01)  # 255 * (1 - 128/255), rounded by Pillow


def test_resize_output_size_by_hand():
    config = PreprocessConfig.from_dict(LLAVA)
    assert resize_hw(480, 640, config) == (336, 448)  # int(336 * 640 / 480)
    assert resize_hw(640, 480, config) == (448, 336)
    assert resize_hw(100, 333, config) == (336, 1118)  # int(336 * 3.33) = 1118 (truncated, like torchvision)
    assert resize_hw(7, 7, config) == (336, 336)
    fixed = PreprocessConfig.from_dict({"size": {"height": 30, "width": 21}})
    assert resize_hw(480, 640, fixed) == (30, 21)


def test_center_crop_by_hand():
    image = np.arange(7 * 9).reshape(7, 9, 1)  # [7, 9, 1]
    crop = center_crop(image, (3, 4))
    assert crop[..., 0].tolist() == [[20, 21, 22, 23], [29, 30, 31, 32], [38, 39, 40, 41]]  # top 2, left 2


def test_center_crop_pads_a_small_image_with_zeros():
    image = np.ones((2, 3, 1))  # [2, 3, 1]
    crop = center_crop(image, (4, 4))[..., 0]
    assert crop.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]  # top pad ceil(2/2)=1, left ceil(1/2)=1


def test_grey_array_equals_its_rgb_repeat():
    grey = textured(20, 30, 1)[..., 0]
    config = PreprocessConfig.from_dict(CONFIGS["small-nonsquare-crop"])
    np.testing.assert_array_equal(preprocess_array(grey, config), preprocess_array(np.repeat(grey[..., None], 3, 2), config))


# ------------------------------------------------------------------------------------- bad arrays


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_with_nan_or_inf_is_refused(bad):
    array = np.full((8, 8, 3), 100.0)
    array[3, 4, 1] = bad
    with pytest.raises(UserError) as e:
        preprocess_array(array, PreprocessConfig(), where="pixels.npy")
    assert e.value.where == "pixels.npy" and "finite" in e.value.what and "1 NaN or Inf" in e.value.what


@pytest.mark.parametrize(
    "array, words",
    [(np.full((4, 4, 3), 256.0), "[0, 255]"), (np.full((4, 4, 3), 0.5), "scale them by 255"), (np.full((4, 4, 3), -1), "[0, 255]"), (np.zeros((4, 4, 4)), "[H, W, 3]"),
     (np.zeros((1, 3, 4, 4)), "[H, W, 3]"), (np.zeros((0, 4, 3)), "[H, W, 3]"), (np.zeros((4, 4, 3), bool), "numeric"),
     (np.array([["a"]]), "numeric")],
)
def test_bad_arrays_are_refused(array, words):
    with pytest.raises(UserError) as e:
        preprocess_array(array, PreprocessConfig())
    assert words in e.value.what


# ------------------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "patch, words",
    [({"size": {"longest_edge": 3}}, "size"), ({"size": 0}, "size"), ({"crop_size": {"height": 3}}, "crop_size"),
     ({"resample": 9}, "resample"), ({"resample": "bicubic"}, "resample"), ({"image_std": [0.2, 0.0, 0.3]}, "image_std"),
     ({"image_mean": [0.5, 0.5]}, "image_mean"), ({"rescale_factor": float("nan")}, "rescale_factor"),
     ({"do_resize": "yes"}, "do_resize")],
)
def test_bad_config_fields_are_refused(patch, words):
    with pytest.raises(UserError) as e:
        PreprocessConfig.from_dict({**LLAVA, **patch}, where="bundle/preprocessor_config.json")
    assert e.value.where == "bundle/preprocessor_config.json" and words in e.value.what


def test_config_file_missing_or_malformed(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        PreprocessConfig.from_file(tmp_path / "preprocessor_config.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="expected a JSON"):
        PreprocessConfig.from_file(tmp_path / "bad.json")


def test_config_from_file_reads_the_llava_config(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LLAVA))
    config = PreprocessConfig.from_file(tmp_path / "preprocessor_config.json")
    assert (config.shortest_edge, config.crop_hw, config.resample, config.output_hw) == (336, (336, 336), 3, (336, 336))


def test_mode_without_rgb_conversion_is_refused():
    config = PreprocessConfig.from_dict({**LLAVA, "do_convert_rgb": False})
    assert preprocess(make_image("RGB"), config).shape == (1, 3, 336, 336)
    with pytest.raises(UserError, match="do_convert_rgb"):
        preprocess(make_image("L"), config)


# ------------------------------------------------------------------------------------- bad files


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to declare width x height (CRC fixed): a decompression bomb header."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded."""

    def load(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_the_no_decoding_fixture_catches_decoding(tmp_path, no_decoding):
    path = tmp_path / "a.png"
    path.write_bytes(png_declaring(2, 2))
    with pytest.raises(AssertionError, match="decoded"):
        load_image(path)


@pytest.mark.parametrize(
    "width, height",
    [(100_000, 100_000),  # beyond Pillow's own hard limit (2 x 89.5 MP): Pillow refuses inside Image.open
     (10_000, 10_000),  # 100 MP: above ours (67 MP), below Pillow's hard limit: our header check refuses
     (8193, 8192)],  # one column past our limit
)
def test_decompression_bomb_is_refused_before_decoding(tmp_path, no_decoding, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(width, height))
    with pytest.raises(UserError) as e:
        load_image(path)
    assert e.value.where == str(path)
    assert "expected an image file" in e.value.what and "before decoding" in e.value.what
    assert width * height > MAX_IMAGE_PIXELS


def test_pixel_limit_is_a_parameter(tmp_path, no_decoding):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(path)
    with pytest.raises(UserError, match="40 x 30 = 1,200 pixels"):
        load_image(path, max_pixels=1199)


def test_image_at_the_limit_loads(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    image = load_image(path, max_pixels=1200)
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (1, 2, 3)


def test_exif_orientation_is_applied(tmp_path):
    """Like transformers.image_utils.load_image: a phone photo tagged 'rotate 90' comes out upright."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    assert load_image(path).size == (30, 40)


def good_png(tmp_path) -> bytes:
    path = tmp_path / "good.png"
    Image.fromarray(textured(64, 64, 3)).save(path)
    return path.read_bytes()


def good_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(textured(64, 64, 3)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, content, words",
    [("empty.png", lambda tmp: b"", "empty"),
     ("notes.png", lambda tmp: b"this is a text file, not a picture\n" * 10, "not a format Pillow recognises"),
     ("weights.jpg", lambda tmp: b"\x80\x04\x95" + bytes(200), "not a format Pillow recognises"),  # a pickle header
     ("truncated.png", lambda tmp: good_png(tmp)[: len(good_png(tmp)) // 2], "cannot decode"),
     ("truncated.jpg", lambda tmp: good_jpeg()[: len(good_jpeg()) // 2], "cannot decode"),
     ("header-only.png", lambda tmp: good_png(tmp)[:40], "")],
)
def test_bad_image_files_are_refused(tmp_path, name, content, words):
    path = tmp_path / name
    data = content(tmp_path)
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_image(path)
    assert e.value.where == str(path)
    assert e.value.what.startswith("expected an image file (PNG, JPEG, ...)")
    assert words in e.value.what
    assert path.read_bytes() == data  # the input is untouched


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="directory"):
        load_image(tmp_path)
