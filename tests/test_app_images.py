"""Safe image loading for the app: every kind of bad or odd upload gives a clear answer."""

import io

import numpy as np
import pytest
from PIL import Image

from ui.images import (MAX_PIXELS, ImageBank, ImageInputError, for_display, load_upload,
                                  prepare_source)
from mteditlab.world import generate_session, render


def png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A tiny file that declares ~400 megapixels (bilevel, compresses to almost nothing)."""
    return png(Image.new("1", (20_000, 20_000)))


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am a text file\n" * 10, "not an image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not an image"),
])
def test_non_images_are_refused_with_a_message(data, message):
    with pytest.raises(ImageInputError, match=message):
        load_upload(data)


def test_truncated_png_is_refused():
    data = png(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        load_upload(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    data = bomb_png()
    assert len(data) < 200_000 and 20_000 * 20_000 > MAX_PIXELS
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_upload(data)


def test_modes_become_8bit_rgb():
    gray = Image.linear_gradient("L").resize((32, 32))
    assert load_upload(png(gray)).mode == "RGB"
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))           # fully transparent red
    assert load_upload(png(rgba)).getpixel((0, 0)) == (255, 255, 255)  # -> over white
    half = Image.new("LA", (8, 8), (0, 128))
    assert load_upload(png(half)).getpixel((0, 0)) == (127, 127, 127)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))  # 16-bit white
    out = load_upload(png(sixteen))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)
    mid = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert load_upload(png(mid)).getpixel((0, 0))[0] in (127, 128)  # scaled, not clipped
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 255] * 256)
    assert load_upload(png(palette)).getpixel((0, 0)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    r, g, b = load_upload(buf.getvalue()).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))                   # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                             # rotate 90° clockwise to view
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    out = load_upload(buf.getvalue())
    assert out.size == (20, 40)                                  # portrait once rotated
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and bottom[2] > 200                      # red on top, blue below


def test_paths_and_oversized_files(tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(png(render(generate_session("test", 1).source)))
    assert load_upload(str(path)).size == (32, 32)
    with pytest.raises(ImageInputError, match="Could not read"):
        load_upload(str(tmp_path / "missing.png"))


def test_prepare_source_crops_resizes_and_round_trips_world_renders():
    scene_image = render(generate_session("test", 2).source)
    big = for_display(scene_image)                               # NEAREST ×8
    assert big.size == (256, 256)
    assert np.array_equal(np.asarray(prepare_source(big, 32)), np.asarray(scene_image))
    wide = Image.new("RGB", (300, 100), (0, 200, 0))
    assert prepare_source(wide, 32).size == (32, 32)


def test_bank_uses_the_label_store_hash_and_evicts():
    from labeling.blobs import canonical_png
    import hashlib

    image = render(generate_session("test", 3).source)
    bank = ImageBank(max_bytes=10_000)
    sha = bank.put(image)
    assert sha == hashlib.sha256(canonical_png(image)[0]).hexdigest()
    assert np.array_equal(np.asarray(bank.get(sha)), np.asarray(image))
    for i in range(60):                                          # push it out of the LRU
        bank.put(Image.effect_noise((32, 32), 40 + i).convert("RGB"))
    assert sha not in bank
    with pytest.raises(KeyError):
        bank.get(sha)
