"""Tests for cellseg_lite.io: every file kind the challenge ships, lossless labels, the normalisation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.exposure import rescale_intensity

from cellseg_lite import CellSegError, io

# ----------------------------------------------------------------------------- helpers


def random_image(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """A random image filling most of the dtype's range (floats in [-1, 2))."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (rng.random(shape) * 3 - 1).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def smooth_image(shape) -> np.ndarray:
    """A uint8 gradient image: JPEG keeps it within a few grey levels."""
    h, w = shape[:2]
    ramp = (np.add.outer(np.arange(h) * 2, np.arange(w) * 3) % 200 + 20).astype(np.uint8)
    if len(shape) == 2:
        return ramp
    return np.stack([np.roll(ramp, 5 * c, axis=1) for c in range(shape[2])], axis=-1)


def reference_normalize(image: np.ndarray) -> np.ndarray:
    """The challenge preprocessing written out plainly, in float64, one channel at a time."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    out = np.zeros((*image.shape[:2], 3), np.uint8)
    for c in range(min(3, image.shape[2])):
        channel = image[..., c].astype(np.float64)
        nonzero = channel[channel != 0]
        if nonzero.size == 0:
            continue
        low, high = np.percentile(nonzero, [1, 99])
        if high - low > 1e-3:
            out[..., c] = ((np.clip(channel, low, high) - low) / (high - low) * 255).astype(
                np.uint8
            )
        else:
            out[..., c] = np.clip(channel, 0, 255).astype(np.uint8)
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files an atomic write might have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- file names


def test_supported_extensions_and_helpers():
    assert io.SUPPORTED_EXTENSIONS == (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
    assert io.is_image_file("a/B.TIFF") and io.is_image_file("x.Png") and io.is_image_file("y.jpeg")
    assert not io.is_image_file("notes.txt") and not io.is_image_file("cell.gif")
    assert io.image_stem("images/cell_00001.tiff") == "cell_00001"
    assert io.image_stem(Path("cell_00002.PNG")) == "cell_00002"
    assert io.image_stem("a.b.png") == "a.b"
    assert io.image_stem("readme.txt") == "readme.txt"


# ----------------------------------------------------------------------------- round trips

# (extension, dtype, shape written); lossless unless the extension is JPEG.
ROUND_TRIPS = (
    [
        (ext, dtype, shape)
        for ext in (".tif", ".tiff")
        for dtype in (np.uint8, np.uint16, np.int32, np.float32)
        for shape in ((24, 32), (24, 32, 1), (24, 32, 2), (24, 32, 3), (24, 32, 4), (24, 32, 6))
    ]
    + [
        (".png", dtype, shape)
        for dtype in (np.uint8, np.uint16)
        for shape in ((24, 32), (24, 32, 1), (24, 32, 2), (24, 32, 3), (24, 32, 4))
    ]
    + [(".bmp", np.uint8, shape) for shape in ((24, 32), (24, 32, 1), (24, 32, 3))]
    + [(ext, np.uint8, shape) for ext in (".jpg", ".jpeg") for shape in ((24, 32), (24, 32, 3))]
    + [
        (".TIF", np.uint16, (24, 32, 3)),
        (".PNG", np.uint16, (24, 32)),
        (".JPG", np.uint8, (24, 32)),
    ]
)


@pytest.mark.parametrize(
    ("ext", "dtype", "shape"),
    ROUND_TRIPS,
    ids=[f"{e}-{np.dtype(d).name}-{'x'.join(map(str, s))}" for e, d, s in ROUND_TRIPS],
)
def test_write_read_round_trip(tmp_path, rng, ext, dtype, shape):
    lossy = ext.lower() in (".jpg", ".jpeg")
    image = smooth_image(shape) if lossy else random_image(rng, shape, dtype)
    path = tmp_path / f"image{ext}"
    io.write_image(path, image)
    back = io.read_image(path)
    expected = image[..., 0] if len(shape) == 3 and shape[2] == 1 else image  # (H, W, 1) squeezed
    assert back.dtype == np.dtype(dtype)
    assert back.shape == expected.shape
    assert back.dtype.isnative
    if lossy:
        assert np.abs(back.astype(int) - expected).mean() < 3
    else:
        np.testing.assert_array_equal(back, expected)


def test_sixteen_bit_colour_png_keeps_sixteen_bits(tmp_path, rng):
    # Pillow would silently read this file as 8-bit RGB.
    image = random_image(rng, (20, 30, 3), np.uint16)
    io.write_image(tmp_path / "rgb16.png", image)
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgb16.png"), image)


def test_png_written_by_pillow(tmp_path, rng):
    gray16 = random_image(rng, (20, 30), np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")  # Pillow mode I;16
    back = io.read_image(tmp_path / "gray16.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, gray16)

    rgba = random_image(rng, (20, 30, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(io.read_image(tmp_path / "rgba.png"), rgba)

    palette = Image.fromarray(random_image(rng, (20, 30), np.uint8)).convert("P")
    palette.save(tmp_path / "palette.png")
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(io.read_image(tmp_path / "palette.png"), expected)


def test_bmp_palette_and_one_bit(tmp_path, rng):
    gray = random_image(rng, (20, 30), np.uint8)
    colour = Image.fromarray(random_image(rng, (20, 30, 3), np.uint8)).convert("P")
    colour.save(tmp_path / "colour_palette.bmp")
    back = io.read_image(tmp_path / "colour_palette.bmp")
    np.testing.assert_array_equal(back, np.asarray(colour.convert("RGB")))
    Image.fromarray(gray).convert("P").save(tmp_path / "gray_palette.bmp")  # Pillow reads it as L
    np.testing.assert_array_equal(io.read_image(tmp_path / "gray_palette.bmp"), gray)
    Image.fromarray(gray > 128).save(tmp_path / "mask.bmp")
    np.testing.assert_array_equal(
        io.read_image(tmp_path / "mask.bmp"), np.where(gray > 128, 255, 0)
    )


@pytest.mark.parametrize("compression", ["zlib", "lzw", "packbits", "zstd"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_compressed_tiff(tmp_path, rng, compression, dtype):
    image = random_image(rng, (40, 50, 3), dtype)
    path = tmp_path / "compressed.tif"
    tifffile.imwrite(path, image, photometric="rgb", compression=compression)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression != 1  # really compressed
    np.testing.assert_array_equal(io.read_image(path), image)


def test_bilevel_tiff_reads_as_0_255_and_as_labels_0_1(tmp_path, rng):
    mask = random_image(rng, (20, 30), np.uint8) > 128
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    back = io.read_image(tmp_path / "mask.tif")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, np.where(mask, 255, 0))
    np.testing.assert_array_equal(io.read_labels(tmp_path / "mask.tif"), mask.astype(np.int32))


def test_big_endian_tiff_comes_back_native(tmp_path, rng):
    image = random_image(rng, (20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", image, byteorder=">")
    back = io.read_image(tmp_path / "be.tif")
    assert back.dtype == np.uint16 and back.dtype.isnative
    np.testing.assert_array_equal(back, image)


# ----------------------------------------------------------------------------- TIFF layouts

CHANNEL_FIRST = {
    "imagej-CYX": dict(imagej=True, metadata={"axes": "CYX"}),
    "ome-CYX": dict(ome=True, metadata={"axes": "CYX"}),
    "planar-rgb-SYX": dict(photometric="rgb", planarconfig="separate"),
    "no-metadata-QYX": dict(photometric="minisblack"),
}


CHANNEL_FIRST_CASES = [
    (layout, channels)
    for layout in CHANNEL_FIRST
    for channels in (2, 3, 4)
    if not (layout == "planar-rgb-SYX" and channels == 2)  # RGB has at least 3 samples
]


@pytest.mark.parametrize(("layout", "channels"), CHANNEL_FIRST_CASES)
def test_channel_first_tiff_becomes_channel_last(tmp_path, rng, layout, channels):
    image = random_image(rng, (channels, 24, 32), np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, image, **CHANNEL_FIRST[layout])
    back = io.read_image(path)
    assert back.shape == (24, 32, channels)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, np.moveaxis(image, 0, -1))


def test_channel_last_tiff_without_metadata(tmp_path, rng):
    # tifffile stores an (H, W, 5) array without `photometric` as H pages of (W, 5),
    # axes 'QYX': the shape heuristic must still see (H, W, C).
    image = random_image(rng, (24, 32, 5), np.float32)
    tifffile.imwrite(tmp_path / "five.tif", image)
    np.testing.assert_array_equal(io.read_image(tmp_path / "five.tif"), image)


def test_singleton_axes_are_dropped(tmp_path, rng):
    image = random_image(rng, (1, 1, 24, 32), np.uint8)
    tifffile.imwrite(tmp_path / "one.tif", image, imagej=True, metadata={"axes": "TZYX"})
    np.testing.assert_array_equal(io.read_image(tmp_path / "one.tif"), image[0, 0])


STACKS = {
    "imagej-ZYX": ((5, 24, 32), dict(imagej=True, metadata={"axes": "ZYX"})),
    "imagej-TYX-two-planes": ((2, 24, 32), dict(imagej=True, metadata={"axes": "TYX"})),
    "ome-ZCYX": ((2, 3, 24, 32), dict(ome=True, metadata={"axes": "ZCYX"})),
    "no-metadata-many-planes": ((10, 24, 32), dict(photometric="minisblack")),
}


@pytest.mark.parametrize("layout", list(STACKS))
def test_three_d_stack_is_refused(tmp_path, rng, layout):
    shape, options = STACKS[layout]
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, random_image(rng, shape, np.uint8), **options)
    with pytest.raises(CellSegError, match=r"stack\.tif.*3-D stack.*pass one plane"):
        io.read_image(path)


# ----------------------------------------------------------------------------- read errors


def test_missing_file(tmp_path):
    with pytest.raises(CellSegError, match=r"nothere\.png.*file not found"):
        io.read_image(tmp_path / "nothere.png")
    with pytest.raises(CellSegError, match=r"nothere\.tiff.*file not found"):
        io.read_labels(str(tmp_path / "nothere.tiff"))


def test_folder_is_not_an_image(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(CellSegError, match=r"folder\.png.*not a file"):
        io.read_image(tmp_path / "folder.png")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "cells.gif"
    Image.new("L", (8, 8)).save(path)
    with pytest.raises(CellSegError, match=r"cells\.gif.*unsupported file type '\.gif'.*\.tif"):
        io.read_image(path)
    (tmp_path / "noext").write_bytes(b"data")
    with pytest.raises(CellSegError, match=r"noext.*no extension"):
        io.read_image(tmp_path / "noext")


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff", ".jpg", ".bmp"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path, rng, ext, keep):
    path = tmp_path / f"cut{ext}"
    io.write_image(path, smooth_image((64, 64, 3)))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CellSegError, match=rf"cut\{ext}.*cannot be read.*truncated or corrupt"):
        io.read_image(path)


@pytest.mark.parametrize("content", [b"", b"this is not an image"])
def test_garbage_file(tmp_path, content):
    for ext in (".png", ".tif", ".jpg"):
        path = tmp_path / f"junk{ext}"
        path.write_bytes(content)
        with pytest.raises(CellSegError, match=rf"junk\{ext}.*cannot be read"):
            io.read_image(path)


def test_png_content_under_a_tiff_name(tmp_path, rng):
    path = tmp_path / "really_png.tif"
    Image.fromarray(random_image(rng, (8, 8), np.uint8)).save(path, format="PNG")
    with pytest.raises(CellSegError, match=r"really_png\.tif.*cannot be read as a TIFF"):
        io.read_image(path)


def test_image_with_no_pixels(tmp_path):
    path = tmp_path / "empty.tif"
    with warnings.catch_warnings():  # tifffile warns that a zero-size TIFF is nonconformant
        warnings.simplefilter("ignore", UserWarning)
        tifffile.imwrite(path, np.zeros((0, 20), np.uint8))
    with pytest.raises(CellSegError, match=r"empty\.tif.*no pixels"):
        io.read_image(path)
    with pytest.raises(CellSegError, match=r"empty\.tif.*no pixels"):
        io.read_labels(path)


# ----------------------------------------------------------------------------- labels


def test_write_labels_seventy_thousand_cells(tmp_path):
    labels = np.zeros((300, 300), np.int32)
    labels.flat[:70_000] = np.arange(1, 70_001)  # ids 1..70000, then background
    path = tmp_path / "many_label.tiff"
    io.write_labels(path, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].dtype == np.uint32
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    back = io.read_labels(path)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    assert len(np.unique(back)) - 1 == 70_000


@pytest.mark.parametrize(
    ("max_id", "stored"),
    [(0, np.uint16), (3, np.uint16), (300, np.uint16), (65_535, np.uint16), (65_536, np.uint32)],
)
def test_write_labels_narrowest_type_never_eight_bit(tmp_path, max_id, stored):
    labels = np.zeros((16, 16), np.int64)
    labels[3:6, 3:6] = max_id
    labels[10, 10] = min(1, max_id)
    io.write_labels(tmp_path / "l.tif", labels)
    with tifffile.TiffFile(tmp_path / "l.tif") as tif:
        assert tif.pages[0].dtype == stored
    np.testing.assert_array_equal(io.read_labels(tmp_path / "l.tif"), labels)


def test_write_labels_creates_folders_and_accepts_integer_floats(tmp_path):
    path = tmp_path / "a" / "b" / "cell_label.tiff"
    labels = np.array([[0, 1.0], [2.0, 2.0]] * 4)
    io.write_labels(path, labels)
    np.testing.assert_array_equal(io.read_labels(path), labels.astype(np.int32))


def test_write_labels_refuses_other_formats(tmp_path):
    with pytest.raises(CellSegError, match=r"cell_label\.png.*TIFF.*only"):
        io.write_labels(tmp_path / "cell_label.png", np.ones((4, 4), np.int32))
    assert not (tmp_path / "cell_label.png").exists()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([[0, -1], [2, 3]] * 3), r"labels.*>= 0, found -1"),
        (np.array([[0, 1.5], [2, 3]] * 3), r"labels.*fractional"),
        (np.zeros((6, 6, 3), np.uint8), r"labels.*2-D"),
    ],
    ids=["negative", "fractional", "rgb"],
)
def test_write_labels_bad_arrays(tmp_path, labels, message):
    with pytest.raises(CellSegError, match=message):
        io.write_labels(tmp_path / "bad.tif", labels)
    assert list(tmp_path.iterdir()) == []


def test_read_labels_tolerates_png_and_tif(tmp_path, rng):
    labels = rng.integers(0, 400, size=(20, 30)).astype(np.uint16)
    Image.fromarray(labels).save(tmp_path / "l.png")  # 16-bit gray PNG
    tifffile.imwrite(tmp_path / "l.tif", labels.astype(np.float32))  # integer-valued floats
    for name in ("l.png", "l.tif"):
        back = io.read_labels(tmp_path / name)
        assert back.dtype == np.int32 and back.shape == (20, 30)
        np.testing.assert_array_equal(back, labels)


def test_read_labels_palette_png_keeps_indices(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[2:5, 2:5], labels[6:9, 6:10] = 1, 2
    im = Image.fromarray(labels, mode="L").convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "palette_label.png")
    np.testing.assert_array_equal(io.read_labels(tmp_path / "palette_label.png"), labels)


def test_read_labels_negative(tmp_path):
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[0, -3], [1, 2]] * 4, np.int16))
    with pytest.raises(CellSegError, match=r"neg\.tif.*>= 0, found -3"):
        io.read_labels(tmp_path / "neg.tif")


def test_read_labels_fractional(tmp_path):
    tifffile.imwrite(tmp_path / "frac.tif", np.array([[0, 0.5], [1, 2]] * 4, np.float32))
    with pytest.raises(CellSegError, match=r"frac\.tif.*integers, found fractional"):
        io.read_labels(tmp_path / "frac.tif")


def test_read_labels_rgb(tmp_path, rng):
    io.write_image(tmp_path / "rgb_label.png", random_image(rng, (16, 16, 3), np.uint8))
    with pytest.raises(CellSegError, match=r"rgb_label\.png.*3 channels.*colour-coded"):
        io.read_labels(tmp_path / "rgb_label.png")


def test_read_labels_refuses_jpeg_and_unknown_types(tmp_path):
    io.write_image(tmp_path / "l.jpg", np.zeros((8, 8), np.uint8))
    with pytest.raises(CellSegError, match=r"l\.jpg.*JPEG is lossy"):
        io.read_labels(tmp_path / "l.jpg")
    (tmp_path / "l.npy").write_bytes(b"x")
    with pytest.raises(CellSegError, match=r"l\.npy.*unsupported file type.*labels"):
        io.read_labels(tmp_path / "l.npy")


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_temporary_file(tmp_path, rng):
    io.write_labels(tmp_path / "a_label.tiff", np.ones((8, 8), np.int32))
    io.write_image(tmp_path / "a.png", random_image(rng, (8, 8), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_label.tiff"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "cell_label.tiff"
    old = np.arange(64, dtype=np.int32).reshape(8, 8)
    io.write_labels(path, old)
    before = path.read_bytes()

    def broken_imwrite(fh, data, **kwargs):
        fh.write(b"II*\x00 half a TIFF")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io.tifffile, "imwrite", broken_imwrite)
    with pytest.raises(RuntimeError, match="disk on fire"):
        io.write_labels(path, np.ones((8, 8), np.int32))
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(io.read_labels(path), old)


def test_atomic_write_context_manager(tmp_path):
    path = tmp_path / "sub" / "model.bin"
    with io.atomic_write(path) as fh:
        fh.write(b"first")
        assert not path.exists()  # nothing visible until the write succeeds
    assert path.read_bytes() == b"first"
    with pytest.raises(KeyError), io.atomic_write(path) as fh:
        fh.write(b"second, interrupted")
        raise KeyError("interrupted")
    assert path.read_bytes() == b"first"
    assert leftovers(path.parent) == []


def test_atomic_write_file_mode_follows_umask(tmp_path):
    with io.atomic_write(tmp_path / "f.bin") as fh:
        fh.write(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_into_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CellSegError, match=r"cannot write here"):
        io.write_labels(tmp_path / "file" / "l.tif", np.ones((4, 4), np.int32))


def test_os_error_during_write_is_reported_against_the_file(tmp_path, monkeypatch):
    def full_disk(fh, data, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.tifffile, "imwrite", full_disk)
    with pytest.raises(CellSegError, match=r"l\.tif.*writing failed.*No space left"):
        io.write_labels(tmp_path / "l.tif", np.ones((4, 4), np.int32))
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- write_image errors


@pytest.mark.parametrize(
    ("name", "image", "message"),
    [
        ("a.gif", np.zeros((8, 8), np.uint8), r"a\.gif.*unsupported file type '\.gif'"),
        ("a.png", np.zeros((8, 8), np.float32), r"a\.png.*PNG holds uint8 or uint16.*float32"),
        ("a.png", np.zeros((8, 8, 5), np.uint8), r"a\.png.*PNG holds.*5 channels"),
        ("a.jpg", np.zeros((8, 8), np.uint16), r"a\.jpg.*\.jpg holds uint8 gray or RGB.*uint16"),
        ("a.bmp", np.zeros((8, 8, 4), np.uint8), r"a\.bmp.*\.bmp holds uint8.*4 channels"),
        ("a.tif", np.zeros((0, 8), np.uint8), r"image.*no pixels"),
    ],
)
def test_write_image_errors(tmp_path, name, image, message):
    with pytest.raises(CellSegError, match=message):
        io.write_image(tmp_path / name, image)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- normalize_image


def test_normalize_literal_table():
    # Non-zero pixels 10..50: p1 = 10.4, p99 = 49.6; (x - 10.4) / 39.2 * 255, truncated.
    image = np.array([[0, 10, 20], [30, 40, 50]], np.uint8)
    expected = np.array([[0, 0, 62], [127, 192, 255]], np.uint8)
    out = io.normalize_image(image)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_normalize_literal_table_sixteen_bit_colour():
    # Channel 0: the table above times 1000 (plus a zero row); channel 1 constant
    # (kept, saturated at 255); channel 2 empty (stays 0).
    ramp = np.array([[0, 10, 20], [30, 40, 50], [0, 0, 0]], np.uint16) * 1000
    image = np.stack([ramp, np.full((3, 3), 300, np.uint16), np.zeros((3, 3), np.uint16)], -1)
    out = io.normalize_image(image)
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 62], [127, 192, 255], [0, 0, 0]])
    np.testing.assert_array_equal(out[..., 1], np.full((3, 3), 255))
    np.testing.assert_array_equal(out[..., 2], np.zeros((3, 3)))


LAYOUTS = [(48, 40), (48, 40, 1), (48, 40, 3), (48, 40, 4)]


@pytest.mark.parametrize("shape", LAYOUTS, ids=["HW", "HW1", "HW3", "HW4"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_normalize_matches_reference(rng, dtype, shape):
    image = random_image(rng, shape, dtype)
    if np.dtype(dtype).kind == "f":
        image = image * np.float32(1000)  # a float image with a wide range
    image[rng.random(shape) < 0.3] = 0  # background the percentiles must ignore
    out = io.normalize_image(image)
    expected = reference_normalize(image)
    assert out.shape == (48, 40, 3) and out.dtype == np.uint8
    if image.dtype == np.float32:
        # skimage (and so the baseline) computes in float32: one level of difference is
        # allowed, and the top value can be 254 (255 * 0.99999994, truncated).
        assert np.abs(out.astype(int) - expected).max() <= 1
        assert (out == expected).mean() > 0.99
    else:
        np.testing.assert_array_equal(out, expected)
        assert out.max() == 255
    assert out.min() == 0


def test_normalize_gray_repeats_and_two_channels_pad(rng):
    gray = random_image(rng, (20, 30), np.uint16)
    out = io.normalize_image(gray)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(io.normalize_image(gray[..., None]), out)
    two = io.normalize_image(np.stack([gray, gray // 2], -1))
    np.testing.assert_array_equal(two[..., 0], out[..., 0])
    assert (two[..., 2] == 0).all()


def test_normalize_constant_and_empty(rng):
    np.testing.assert_array_equal(io.normalize_image(np.zeros((8, 9), np.uint16)), 0)
    np.testing.assert_array_equal(io.normalize_image(np.full((8, 9), 7, np.uint8)), 7)
    np.testing.assert_array_equal(io.normalize_image(np.full((8, 9), 7.9)), 7)  # truncated
    np.testing.assert_array_equal(io.normalize_image(np.full((8, 9), 300, np.uint16)), 255)
    mask = np.zeros((8, 9), bool)
    mask[2:5, 3:6] = True
    np.testing.assert_array_equal(io.normalize_image(mask)[..., 0], mask.astype(np.uint8))


def test_normalize_float_rows_in_blocks(rng, monkeypatch):
    image = random_image(rng, (37, 23, 3), np.float64)
    whole = io.normalize_image(image)
    monkeypatch.setattr(io, "_CHUNK_PIXELS", 50)  # forces blocks of 2 rows
    np.testing.assert_array_equal(io.normalize_image(image), whole)
    np.testing.assert_array_equal(whole, reference_normalize(image))


def _sparse_image(cell_value: int = 100) -> np.ndarray:
    """Background noise 10..15 and one disc of ``cell_value`` on 0.17% of the pixels."""
    image = np.random.default_rng(0).integers(10, 16, (256, 256)).astype(np.uint16)
    yy, xx = np.mgrid[:256, :256]
    image[(yy - 100) ** 2 + (xx - 80) ** 2 <= 36] = cell_value
    return image


def test_sparse_cells_rescue_a_cell_from_stretched_background_noise():
    image = _sparse_image()
    cell = image == 100
    challenge = io.normalize_image(image)[..., 0]
    sparse = io.normalize_image(image, sparse_cells=True)[..., 0]
    # the baseline: the 99th percentile is background, its noise spans 0..255 like the cell
    assert (challenge[~cell] == 255).mean() > 0.1
    # mended: the cell saturates, the background stays dark
    assert (sparse[cell] == 255).all() and sparse[~cell].max() < 128
    low, tail = np.percentile(image[image != 0], [1, io.SPARSE_TAIL_PERCENTILE])
    high = low + (tail - low) / io.SPARSE_TAIL_RATIO
    expected = rescale_intensity(image, in_range=(low, high), out_range="uint8")
    np.testing.assert_array_equal(sparse, expected)
    for c in (1, 2):
        np.testing.assert_array_equal(io.normalize_image(image, sparse_cells=True)[..., c], sparse)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_sparse_cells_leave_other_images_as_the_baseline_has_them(rng, dtype):
    image = random_image(rng, (48, 40, 3), dtype)
    image[rng.random((48, 40, 3)) < 0.3] = 0
    np.testing.assert_array_equal(
        io.normalize_image(image, sparse_cells=True), io.normalize_image(image)
    )


@pytest.mark.parametrize("bright, changed", [(110, False), (170, True)])
def test_sparse_cells_depart_from_the_baseline_past_the_tail_ratio(bright, changed):
    # background 10..50 (p1 about 10, p99 about 50); 0.5% of the pixels at ``bright``, so the
    # 99.9th percentile lies 2.5 (110) or 4 (170) times as far from p1 as the 99th
    image = np.random.default_rng(1).integers(10, 51, (100, 100)).astype(np.uint8)
    image.flat[::200] = bright
    same = np.array_equal(io.normalize_image(image, sparse_cells=True), io.normalize_image(image))
    assert same is not changed


def test_normalize_errors():
    bad = np.ones((8, 8), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(CellSegError, match=r"cell_7\.tif.*NaN or infinite"):
        io.normalize_image(bad, source=Path("cell_7.tif"))
    with pytest.raises(CellSegError, match=r"image.*no pixels"):
        io.normalize_image(np.zeros((0, 5), np.uint8))
    with pytest.raises(CellSegError, match=r"image.*3-D stack"):
        io.normalize_image(np.zeros((2, 3, 8, 8), np.uint8))


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_mini_every_file(real_mini, real_manifest):
    assert len(real_manifest) > 0
    problems = []
    for row in real_manifest:
        image = io.read_image(real_mini / "images" / row["file"])
        channels = int(row["channels"])
        expected = (int(row["height"]), int(row["width"])) + ((channels,) if channels > 1 else ())
        if image.shape != expected or image.dtype != np.dtype(row["dtype"]):
            problems.append(f"{row['file']}: {image.shape} {image.dtype}, manifest {expected}")
        labels = io.read_labels(real_mini / "labels" / f"{row['stem']}_label.tiff")
        if labels.dtype != np.int32 or labels.shape != expected[:2]:
            problems.append(f"{row['stem']} labels: {labels.shape} {labels.dtype}")
        if len(np.unique(labels)) - 1 != int(row["cells"]):
            problems.append(
                f"{row['stem']}: {len(np.unique(labels)) - 1} cells, manifest {row['cells']}"
            )
        normalized = io.normalize_image(image, source=row["file"])
        if normalized.shape != (*expected[:2], 3) or normalized.dtype != np.uint8:
            problems.append(f"{row['file']}: normalized {normalized.shape} {normalized.dtype}")
    assert problems == []


def _rows(manifest, modality):
    rows = [row for row in manifest if row["modality"] == modality]
    assert rows, f"no {modality} image in the manifest"
    return rows


@pytest.mark.realdata
def test_real_phase_contrast_sixteen_bit_tiff(real_mini, real_manifest):
    for row in _rows(real_manifest, "phase-contrast"):
        path = real_mini / "images" / row["file"]
        assert path.suffix == ".tif" and row["dtype"] == "uint16"
        image = io.read_image(path)
        assert image.dtype == np.uint16 and image.ndim == 2
        assert image.max() > 255  # really 16-bit content, not 8-bit in a wide type
        out = io.normalize_image(image)
        np.testing.assert_array_equal(out, reference_normalize(image))
        assert out.min() == 0 and out.max() == 255


@pytest.mark.realdata
def test_real_brightfield_gray_stored_as_rgb(real_mini, real_manifest):
    for row in _rows(real_manifest, "brightfield"):
        image = io.read_image(real_mini / "images" / row["file"])
        assert image.shape == (int(row["height"]), int(row["width"]), 3)
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
        out = io.normalize_image(image)
        assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.realdata
def test_real_zlib_tiff_labels(real_mini, real_manifest):
    for row in real_manifest[:: max(1, len(real_manifest) // 12)]:
        path = real_mini / "labels" / f"{row['stem']}_label.tiff"
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            stored = tif.asarray()
        labels = io.read_labels(path)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, stored)
