"""Image loading (every mode to 8-bit RGB, one-line errors for bad files), resize/crop, buckets."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from accord.data import assign_bucket, load_mask, load_rgb, make_buckets, resize_and_crop
from accord.data.images import image_size, plan_resize_and_crop, to_rgb
from accord.errors import ConfigError, DataError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, width, height, bit_depth, color_type, rows: bytes | None = None):
    """A PNG written by hand: lets a test claim any size (the pixels are never decoded) or use 16 bits."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def pixel(img, xy=(0, 0)):
    assert img.mode == "RGB"
    return img.getpixel(xy)


# ---- modes ---------------------------------------------------------------------------------------


def test_rgb_jpeg_and_extensions(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.png", "d.webp", "e.bmp"):
        fmt = {"JPG": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[name.split(".")[1]]
        Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / name, format=fmt, quality=95)
        img = load_rgb(tmp_path / name)
        assert img.size == (10, 6)
        assert np.allclose(pixel(img), (200, 10, 10), atol=8)


def test_grey_and_bilevel(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "one.png")
    assert pixel(load_rgb(tmp_path / "l.png")) == (77, 77, 77)
    assert pixel(load_rgb(tmp_path / "one.png")) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    img = load_rgb(tmp_path / "rgba.png")
    assert pixel(img) == (255, 255, 255)
    assert pixel(img, (1, 1)) == (0, 0, 0)
    assert all(abs(c - 127) <= 1 for c in pixel(img, (2, 2)))
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert pixel(load_rgb(tmp_path / "la.png")) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "opaque.png")
    pal.save(tmp_path / "transparent.png", transparency=0)
    assert pixel(load_rgb(tmp_path / "opaque.png")) == (10, 20, 30)
    img = load_rgb(tmp_path / "transparent.png")
    assert pixel(img) == (255, 255, 255)
    assert pixel(img, (1, 1)) == (200, 100, 0)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert np.allclose(pixel(load_rgb(tmp_path / "cmyk.jpg")), (255, 0, 0), atol=6)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = load_rgb(tmp_path / "g16.png")
    assert [pixel(img, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_16bit_rgb_and_la_png(tmp_path):
    a = np.zeros((2, 2, 3), ">u2")
    a[..., 0], a[..., 1], a[..., 2] = 65535, 32896, 0
    write_png(tmp_path / "rgb16.png", 2, 2, 16, 2, b"".join(b"\0" + row.tobytes() for row in a))
    assert pixel(load_rgb(tmp_path / "rgb16.png")) == (255, 128, 0)
    la = np.zeros((2, 2, 2), ">u2")  # black, fully transparent → white
    write_png(tmp_path / "la16.png", 2, 2, 16, 4, b"".join(b"\0" + row.tobytes() for row in la))
    assert pixel(load_rgb(tmp_path / "la16.png")) == (255, 255, 255)


def test_int32_and_float_modes():
    assert to_rgb(Image.fromarray(np.full((2, 2), 65535, np.int32), mode="I")).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F")).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90° clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert image_size(tmp_path / "rot.jpg") == (20, 40)
    assert np.allclose(pixel(out, (10, 2)), (255, 0, 0), atol=10)  # the left edge is now the top
    assert np.allclose(pixel(out, (10, 37)), (0, 0, 255), atol=10)


def test_mask_uses_alpha_or_luminance(tmp_path):
    cut = Image.new("RGBA", (4, 4), (9, 9, 9, 0))
    cut.putpixel((1, 1), (9, 9, 9, 255))
    cut.save(tmp_path / "cut.png")
    m = load_mask(tmp_path / "cut.png")
    assert m.mode == "L" and m.getpixel((0, 0)) == 0 and m.getpixel((1, 1)) == 255
    Image.new("RGB", (4, 4), (255, 255, 255)).save(tmp_path / "white.png")
    assert load_mask(tmp_path / "white.png").getpixel((0, 0)) == 255


# ---- bad files -----------------------------------------------------------------------------------


def _jpeg_bytes(size=(64, 64)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_bad_files(folder):
    """{file name: expected words in the error} for every kind of bad file."""
    folder.mkdir(exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "trunc.jpg").write_bytes(_jpeg_bytes()[:600])  # cut inside the header
    jpeg = _jpeg_bytes()
    (folder / "half.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # header fine, scan data cut
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "notes.png").write_text("this is not an image\n")
    write_png(folder / "bomb.png", 20000, 20000, 8, 2)  # header only: never decoded
    write_png(folder / "huge.png", 9000, 9000, 8, 2)  # 81 MP: above our 64 MP default, below PIL's own limit
    return {
        "empty.jpg": "empty (0 bytes)",
        "trunc.jpg": "truncated",
        "half.jpg": "truncated",
        "trunc.png": "truncated",
        "notes.png": "not a readable image",
        "bomb.png": "too large",
        "huge.png": "above the limit",
    }


def test_bad_files_raise_one_line_data_errors(tmp_path):
    for name, words in make_bad_files(tmp_path).items():
        with pytest.raises(DataError) as info:
            load_rgb(tmp_path / name)
        msg = str(info.value)
        assert name in msg and words in msg and "\n" not in msg, msg


def test_size_is_checked_before_decoding(tmp_path):
    write_png(tmp_path / "huge.png", 9000, 9000, 8, 2)  # would be 243 MB decoded; the IDAT is bogus
    with pytest.raises(DataError, match="above the limit"):
        image_size(tmp_path / "huge.png")
    assert image_size(tmp_path / "huge.png", max_pixels=10**8) == (9000, 9000)
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="raise max_pixels"):
        load_rgb(tmp_path / "small.png", max_pixels=399)
    assert load_rgb(tmp_path / "small.png", max_pixels=400).size == (20, 20)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rgb(tmp_path / "nope.jpg")


# ---- resize / crop / buckets ---------------------------------------------------------------------


def test_resize_and_crop_covers_then_crops():
    img = Image.new("RGB", (200, 100))
    assert resize_and_crop(img, 64).size == (64, 64)
    assert resize_and_crop(img, (96, 32)).size == (96, 32)
    assert plan_resize_and_crop(200, 100, 64) == ((128, 64), (0, 32))
    assert plan_resize_and_crop(100, 200, 64) == ((64, 128), (32, 0))
    # random crops come from the generator only
    crops = [plan_resize_and_crop(200, 100, 64, False, torch.Generator().manual_seed(s))[1] for s in (1, 1, 2, 3, 4)]
    assert crops[0] == crops[1] and len(set(crops)) > 1
    assert all(top == 0 and 0 <= left <= 64 for top, left in crops)


def test_resize_and_crop_keeps_content_centred():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre square
    out = resize_and_crop(img, 32, center_crop=True)
    assert np.asarray(out).min() > 230  # (Lanczos rings a little at the edge)


def test_make_buckets():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w, h) / min(w, h) <= 2.0 for w, h in buckets)
    assert set(buckets) == {(h, w) for w, h in buckets}  # symmetric
    assert len(make_buckets(512, max_aspect=4.0)) > len(buckets)
    assert make_buckets(32, step=8)[0][0] < 32
    with pytest.raises(ConfigError, match="multiple"):
        make_buckets(500)


def test_assign_bucket():
    buckets = make_buckets(512)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(4000, 1000, buckets) == (640, 384)  # widest available
    assert assign_bucket(1000, 4000, buckets) == (384, 640)
    assert assign_bucket(1200, 900, buckets) == (576, 448)
    with pytest.raises(ConfigError):
        assign_bucket(10, 10, [])
