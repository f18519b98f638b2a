"""cellseg_lite.datasets: folder layout, training patches, downloads (local HTTP server), archives, DSB."""

from __future__ import annotations

import hashlib
import io as pyio
import re
import shutil
import socket
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellseg_lite import CellSegError
from cellseg_lite import datasets as ds
from cellseg_lite.io import normalize_image

# --------------------------------------------------------------------------------------
# helpers: a challenge-layout folder written with PIL / tifffile directly
# --------------------------------------------------------------------------------------


def _image(shape=(40, 50), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _labels(shape=(40, 50)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    labels[2:10, 3:12] = 7
    labels[15:30, 20:40] = 300  # an id above 255
    labels[32:38, 5:9] = 12
    return labels


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)


def write_labels(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        tifffile.imwrite(path, labels)


def make_layout(root: Path, names: dict[str, str | None], shape=(40, 50)) -> Path:
    """``names``: image file name -> label file name (None: no label file)."""
    for i, (image_name, label_name) in enumerate(names.items()):
        write_image(root / "images" / image_name, _image(shape, seed=i))
        if label_name is not None:
            write_labels(root / "labels" / label_name, _labels(shape))
    (root / "labels").mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------
# find_pairs
# --------------------------------------------------------------------------------------


def test_find_pairs_sorted_with_any_image_extension(tmp_path):
    root = make_layout(
        tmp_path,
        {"b.png": "b_label.tiff", "a.TIF": "a_label.tiff", "c.jpeg": "c_label.tiff"},
    )
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / ".DS_Store").write_bytes(b"\0")
    samples = ds.find_pairs(root)
    assert [s.stem for s in samples] == ["a", "b", "c"]
    assert samples[0] == ds.Sample("a", root / "images" / "a.TIF", root / "labels" / "a_label.tiff")
    assert all(isinstance(s.image_path, Path) for s in samples)


@pytest.mark.parametrize(
    "label_name",
    ["x_label.tiff", "x_label.tif", "x_label.png", "x.tiff", "x.tif", "x.png", "x_label.TIFF"],
)
def test_find_pairs_tolerated_label_names(tmp_path, label_name):
    root = make_layout(tmp_path, {"x.png": label_name})
    (sample,) = ds.find_pairs(root)
    assert sample.label_path == root / "labels" / label_name


def test_find_pairs_unlabelled_images(tmp_path):
    root = make_layout(tmp_path, {"a.png": "a_label.tiff", "b.png": None})
    samples = ds.find_pairs(root, require_labels=False)
    assert [(s.stem, s.label_path is None) for s in samples] == [("a", False), ("b", True)]
    (root / "labels" / "a_label.tiff").unlink()
    (root / "labels").rmdir()
    assert all(s.label_path is None for s in ds.find_pairs(root, require_labels=False))


def test_find_pairs_stems_filter(tmp_path):
    root = make_layout(tmp_path, {f"{s}.png": f"{s}_label.tiff" for s in "abcd"})
    assert [s.stem for s in ds.find_pairs(root, stems=["d", "b", "b"])] == ["b", "d"]
    with pytest.raises(CellSegError, match="requested stem.*zz"):
        ds.find_pairs(root, stems=["a", "zz"])


def test_find_pairs_warns_about_orphan_labels(tmp_path):
    root = make_layout(tmp_path, {"a.png": "a_label.tiff"})
    write_labels(root / "labels" / "ghost_label.tiff", _labels())
    with pytest.warns(UserWarning, match="match no image.*ghost_label.tiff"):
        samples = ds.find_pairs(root)
    assert [s.stem for s in samples] == ["a"]


def test_find_pairs_errors(tmp_path):
    with pytest.raises(CellSegError, match="data folder not found"):
        ds.find_pairs(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CellSegError, match="got a file"):
        ds.find_pairs(tmp_path / "file.txt")
    with pytest.raises(CellSegError, match="no images/ folder"):
        ds.find_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("x")
    with pytest.raises(CellSegError, match="no image files"):
        ds.find_pairs(tmp_path)


def test_find_pairs_label_errors(tmp_path):
    root = make_layout(tmp_path / "one", {"a.png": None})
    (root / "labels").rmdir()
    with pytest.raises(CellSegError, match="no labels/ folder"):
        ds.find_pairs(root)
    root = make_layout(tmp_path / "two", {"a.png": "a_label.tiff", "b.png": None})
    with pytest.raises(CellSegError, match=r"b\.png'?: no label file.*b_label\.tiff"):
        ds.find_pairs(root)
    root = make_layout(tmp_path / "three", {"a.png": "a_label.tiff"})
    write_labels(root / "labels" / "a_label.png", _labels())
    with pytest.raises(CellSegError, match="several label files for image 'a'"):
        ds.find_pairs(root)


def test_find_pairs_duplicate_stems(tmp_path):
    root = make_layout(tmp_path, {"a.png": "a_label.tiff", "a.tif": None})
    with pytest.raises(CellSegError, match="two images share the stem 'a'.*a.png.*a.tif"):
        ds.find_pairs(root)


# --------------------------------------------------------------------------------------
# sample_patch and PatchDataset
# --------------------------------------------------------------------------------------


def test_sample_patch_is_a_window_of_the_input():
    rows, cols = np.mgrid[0:30, 0:40]
    image = np.stack([rows, cols, rows + cols], axis=-1).astype(np.uint8)
    labels = (rows * 40 + cols).astype(np.int32)
    corners = set()
    for seed in range(300):
        patch, lab = ds.sample_patch(image, labels, 8, np.random.default_rng(seed))
        top, left = int(patch[0, 0, 0]), int(patch[0, 0, 1])
        corners.add((top, left))
        np.testing.assert_array_equal(patch, image[top : top + 8, left : left + 8])
        np.testing.assert_array_equal(lab, labels[top : top + 8, left : left + 8])
    tops, lefts = {t for t, _ in corners}, {c for _, c in corners}
    assert min(tops) == 0 and max(tops) == 22 and min(lefts) == 0 and max(lefts) == 32


def test_sample_patch_gray_image_and_errors():
    patch, lab = ds.sample_patch(
        np.ones((5, 6), np.uint16), np.ones((5, 6), np.int32), 8, np.random.default_rng(0)
    )
    assert (
        patch.shape == (8, 8)
        and patch.dtype == np.uint16
        and patch[:5, :6].all()
        and not patch[5:].any()
    )
    with pytest.raises(CellSegError, match="sample_patch: image size"):
        ds.sample_patch(np.ones((5, 6)), np.ones((5, 7), np.int32), 4, np.random.default_rng(0))
    with pytest.raises(CellSegError, match="patch_size"):
        ds.sample_patch(np.ones((5, 6)), np.ones((5, 6), np.int32), 0, np.random.default_rng(0))


def test_sample_patch_pads_small_images_bottom_right():
    image = np.full((5, 12, 3), 200, np.uint8)
    labels = np.ones((5, 12), np.int32)
    patch, lab = ds.sample_patch(image, labels, 8, np.random.default_rng(0))
    assert patch.shape == (8, 8, 3) and lab.shape == (8, 8)
    assert (patch[:5] == 200).all() and (patch[5:] == 0).all()
    assert (lab[:5] == 1).all() and (lab[5:] == 0).all()


@pytest.fixture
def layout(tmp_path) -> Path:
    return make_layout(tmp_path / "data", {f"img{i}.png": f"img{i}_label.tiff" for i in range(3)})


def test_patch_dataset_items(layout):
    data = ds.PatchDataset(ds.find_pairs(layout), 32, patches_per_image=2)
    assert len(data) == 6
    item = data[4]
    assert set(item) == {"image", "labels", "stem"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["labels"].dtype == torch.int32 and item["labels"].shape == (32, 32)
    assert item["stem"] == "img1"  # item i is a patch of image i % 3
    ids = np.unique(item["labels"].numpy())
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))  # relabelled 1..n
    assert data[-1]["stem"] == data[5]["stem"]
    with pytest.raises(IndexError):
        data[6]


def test_patch_dataset_relabels_sequentially_keeping_cells_apart(layout):
    data = ds.PatchDataset(ds.find_pairs(layout), 50, seed=3)  # the image is 40 x 50: all of it
    item = data[0]
    labels = item["labels"].numpy()
    original = _labels()
    np.testing.assert_array_equal(labels[40:], 0)  # padded rows
    inside = labels[:40]
    # same partition of pixels as the original, with ids 1..3
    assert sorted(np.unique(inside)) == [0, 1, 2, 3]
    for old in (7, 12, 300):
        assert len(np.unique(inside[original == old])) == 1


def test_training_images_get_the_segmenters_normalisation(tmp_path):
    # a sparse image (one bright disc on 0.3% of the pixels): the rule that differs
    image = np.random.default_rng(0).integers(10, 16, (64, 64)).astype(np.uint16)
    image[30:33, 20:24] = 900
    write_image(tmp_path / "images" / "sparse.tif", image)
    write_labels(tmp_path / "labels" / "sparse_label.tiff", (image > 100).astype(np.int32))
    loaded, labels = ds.load_sample(ds.find_pairs(tmp_path)[0])
    assert labels.sum() == 12
    np.testing.assert_array_equal(loaded, normalize_image(image, sparse_cells=True))
    assert not np.array_equal(loaded, normalize_image(image))


def test_patch_dataset_pads_small_images(tmp_path):
    root = make_layout(tmp_path, {"small.png": "small_label.tiff"}, shape=(20, 30))
    item = ds.PatchDataset(ds.find_pairs(root), 32)[0]
    image, labels = item["image"].numpy(), item["labels"].numpy()
    expected = normalize_image(_image((20, 30), seed=0)).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(image[:, :20, :30], expected, atol=1e-6)
    assert (image[:, 20:, :] == 0).all() and (image[:, :, 30:] == 0).all()
    assert (labels[20:, :] == 0).all() and (labels[:, 30:] == 0).all()
    original = _labels((20, 30))  # ids 7 and 300 fall inside
    np.testing.assert_array_equal(
        labels[:20, :30], np.select([original == 7, original == 300], [1, 2], 0)
    )


def test_patch_dataset_is_deterministic(layout):
    samples = ds.find_pairs(layout)
    a = ds.PatchDataset(samples, 16, patches_per_image=3, seed=1)
    b = ds.PatchDataset(samples, 16, patches_per_image=3, seed=1, cache=False)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(
            a[i]["labels"], b[i]["labels"]
        )
    first = [a[i]["image"] for i in range(len(a))]
    a.set_epoch(1)
    assert any(not torch.equal(x, a[i]["image"]) for i, x in enumerate(first))
    a.set_epoch(0)
    assert all(torch.equal(x, a[i]["image"]) for i, x in enumerate(first))
    c = ds.PatchDataset(samples, 16, patches_per_image=3, seed=2)
    assert any(not torch.equal(x, c[i]["image"]) for i, x in enumerate(first))
    # no global random state involved
    np.random.seed(0)  # noqa: NPY002 - on purpose: global state must not matter
    torch.manual_seed(0)
    assert all(torch.equal(x, a[i]["image"]) for i, x in enumerate(first))


def test_patch_dataset_cache(layout):
    samples = ds.find_pairs(layout)
    cached = ds.PatchDataset(samples, 16)
    uncached = ds.PatchDataset(samples, 16, cache=False)
    cached[0], uncached[0]
    samples[0].image_path.unlink()
    assert cached[0]["stem"] == "img0"  # served from memory
    with pytest.raises(CellSegError):
        uncached[0]


def test_patch_dataset_transform(layout):
    samples = ds.find_pairs(layout)
    plain = ds.PatchDataset(samples, 16, seed=5)

    def flip(image, labels):
        assert image.dtype == np.uint8 and image.shape == (16, 16, 3) and labels.dtype == np.int32
        return image[:, ::-1], labels[:, ::-1]

    flipped = ds.PatchDataset(samples, 16, seed=5, transform=flip)
    assert torch.equal(flipped[1]["image"], plain[1]["image"].flip(-1))

    def to_float(image, labels):
        return image.astype(np.float64) / 510.0, labels

    halved = ds.PatchDataset(samples, 16, seed=5, transform=to_float)
    np.testing.assert_allclose(halved[1]["image"].numpy(), plain[1]["image"].numpy() / 2, rtol=1e-6)

    def noisy(image, labels, *, rng):
        return np.clip(image / 255.0 + rng.normal(0, 0.1, image.shape), 0, 1), labels

    one = ds.PatchDataset(samples, 16, seed=5, transform=noisy)
    two = ds.PatchDataset(samples, 16, seed=5, transform=noisy)
    assert torch.equal(one[2]["image"], two[2]["image"])
    assert not torch.equal(one[2]["image"], plain[2]["image"])


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda image, labels: image, "must return a tuple"),
        (lambda image, labels: (image[:8], labels[:8]), r"shape \(8, 16, 3\)"),
        (lambda image, labels: (image, labels[:8]), "differ"),
        (lambda image, labels: (image.astype(np.int64), labels), "int64 image"),
    ],
)
def test_patch_dataset_bad_transform_output(layout, transform, message):
    data = ds.PatchDataset(ds.find_pairs(layout), 16, transform=transform)
    with pytest.raises(CellSegError, match=message):
        data[0]


def test_patch_dataset_repeats_draw_some_images_more_often(layout):
    samples = ds.find_pairs(layout)
    data = ds.PatchDataset(samples, 16, patches_per_image=2, repeats=[1, 3, 2], seed=1)
    assert len(data) == 12
    stems = [data[i]["stem"] for i in range(len(data))]
    assert stems == ["img0", "img1", "img1", "img1", "img2", "img2"] * 2
    patches = [data[i]["image"] for i in (1, 2, 3)]  # three different crops of img1
    assert not torch.equal(patches[0], patches[1]) and not torch.equal(patches[1], patches[2])
    np.testing.assert_array_equal(data.repeats, [1, 3, 2])
    data.repeats = None  # back to one per image: the order of a plain dataset
    plain = ds.PatchDataset(samples, 16, patches_per_image=2, seed=1)
    assert len(data) == 6
    assert all(torch.equal(data[i]["image"], plain[i]["image"]) for i in range(6))
    for bad in ([1, 2], [1, 0, 1], [1, 2.5, 1], "abc", 3):
        with pytest.raises(CellSegError, match="repeats"):
            ds.PatchDataset(samples, 16, repeats=bad)


def test_size_repeats_follow_the_side():
    shapes = [(256, 256), (256, 320), (360, 360), (520, 696), (512, 512), (1024, 1024), (64, 64)]
    assert ds.size_repeats(shapes) == [1, 1, 1, 2, 2, 4, 1]
    assert ds.size_repeats([(256, 256, 3), (512, 512)], unit=128) == [2, 4]
    with pytest.raises(CellSegError, match="unit"):
        ds.size_repeats([(256, 256)], unit=0)


def test_patch_dataset_argument_errors(layout):
    samples = ds.find_pairs(layout)
    with pytest.raises(CellSegError, match="empty"):
        ds.PatchDataset([], 16)
    with pytest.raises(CellSegError, match="no label file.*img9"):
        ds.PatchDataset([*samples, ds.Sample("img9", samples[0].image_path, None)], 16)
    for bad in (0, -3, 2.5, True, "16"):
        with pytest.raises(CellSegError, match="patch_size"):
            ds.PatchDataset(samples, bad)
    with pytest.raises(CellSegError, match="patches_per_image"):
        ds.PatchDataset(samples, 16, patches_per_image=0)
    with pytest.raises(CellSegError, match="seed"):
        ds.PatchDataset(samples, 16, seed=-1)
    with pytest.raises(CellSegError, match="transform: expected a callable"):
        ds.PatchDataset(samples, 16, transform="flip")
    with pytest.raises(CellSegError, match="epoch"):
        ds.PatchDataset(samples, 16).set_epoch(-1)


def test_patch_dataset_size_mismatch_names_the_file(tmp_path):
    root = make_layout(tmp_path, {"a.png": None})
    write_labels(root / "labels" / "a_label.tiff", _labels((41, 50)))
    data = ds.PatchDataset(ds.find_pairs(root), 16)
    with pytest.raises(CellSegError, match=r"a_label\.tiff.*differs.*a\.png"):
        data[0]


def test_patch_dataset_in_a_dataloader(layout):
    data = ds.PatchDataset(ds.find_pairs(layout), 24, patches_per_image=2)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=0, shuffle=False)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(4, 3, 24, 24), (2, 3, 24, 24)]
    assert batches[0]["labels"].shape == (4, 24, 24) and batches[0]["labels"].dtype == torch.int32
    assert batches[0]["stem"] == ["img0", "img1", "img2", "img0"]


def test_patch_dataset_same_patches_in_worker_processes(layout):
    data = ds.PatchDataset(ds.find_pairs(layout), 16, patches_per_image=2, seed=4)
    data.set_epoch(2)
    main = torch.utils.data.DataLoader(data, batch_size=3)
    workers = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.realdata
def test_real_mini_pairs_and_patches(real_mini, real_manifest):
    samples = ds.find_pairs(real_mini)
    assert len(samples) == 196
    assert [s.stem for s in samples] == sorted(row["stem"] for row in real_manifest)
    picked = [s for s in samples if s.image_path.suffix == ".tif"][:1] + samples[:2]
    data = ds.PatchDataset(picked, 64, patches_per_image=2)
    for i in range(len(data)):
        item = data[i]
        assert item["image"].shape == (3, 64, 64) and item["labels"].shape == (64, 64)
        assert (
            item["image"].dtype == torch.float32
            and 0 <= item["image"].min() <= item["image"].max() <= 1
        )


# --------------------------------------------------------------------------------------
# a local HTTP server with (optional) Range support
# --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        server = self.server
        server.log.append({"path": self.path, "range": self.headers.get("Range")})
        data = server.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        ask = self.headers.get("Range") if server.support_range else None
        if server.wrong_range:  # always a range nobody asked for
            start = 5
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        elif ask:
            start = int(re.fullmatch(r"bytes=(\d+)-", ask).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:  # promise everything, send part, hang up
            self.wfile.write(body[: server.cut_after])
            server.cut_after = None
            self.close_connection = True
            return
        if server.stall:  # send a little, then go quiet until the client gives up
            self.wfile.write(body[:1000])
            self.wfile.flush()
            server.stall.wait(15)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.log, httpd.support_range, httpd.cut_after = {}, [], True, None
    httpd.wrong_range, httpd.stall = False, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield httpd
    if httpd.stall:
        httpd.stall.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


PAYLOAD = bytes(np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8))
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()

network = pytest.mark.network


@network
def test_download_and_verify(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "sub" / "data.bin"
    out = ds.download(f"{server.url}/data.bin?download=1", dest, sha256=SHA, md5=MD5, progress=True)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert ds.file_hash(dest) == SHA and ds.file_hash(dest, "md5") == MD5
    # an existing, correct file is returned without a request
    n = len(server.log)
    assert ds.download(f"{server.url}/data.bin", dest, sha256=SHA.upper()) == dest
    assert len(server.log) == n


@network
def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    with pytest.raises(
        ds.DownloadError, match=r"/data\.bin: the downloaded file's sha256 .*deleted"
    ):
        ds.download(f"{server.url}/data.bin", dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()
    with pytest.raises(ds.DownloadError, match="md5"):
        ds.download(f"{server.url}/data.bin", dest, md5="f" * 32, progress=False)
    dest.write_bytes(b"something else")
    with pytest.raises(CellSegError, match="exists but its sha256.*delete it"):
        ds.download(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)


@network
def test_download_resumes_a_partial_file(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    half = len(PAYLOAD) // 2
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:half])
    ds.download(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.log] == [f"bytes={half}-"]


@network
def test_download_without_resume_starts_over(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(b"junk" * 1000)
    ds.download(
        f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA, resume=False, progress=False
    )
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.log] == [None]


@network
def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.support_range = False
    (tmp_path / "data.bin.part").write_bytes(b"\xff" * 1000)  # wrong bytes: appending would fail
    ds.download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert len(server.log) == 1 and server.log[0]["range"] == "bytes=1000-"


@network
def test_download_partial_file_already_complete_or_too_long(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    ds.download(f"{server.url}/data.bin", tmp_path / "a.bin", sha256=SHA, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.log] == [f"bytes={len(PAYLOAD)}-"]  # answered 416
    (tmp_path / "b.bin.part").write_bytes(PAYLOAD + b"extra")
    ds.download(f"{server.url}/data.bin", tmp_path / "b.bin", sha256=SHA, progress=False)
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD
    assert [r["range"] for r in server.log[1:]] == [f"bytes={len(PAYLOAD) + 5}-", None]


@network
def test_download_interrupted_then_resumed(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.cut_after = 100_000
    dest = tmp_path / "data.bin"
    with pytest.raises(ds.DownloadError, match="resumes"):
        ds.download(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)
    part = tmp_path / "data.bin.part"
    assert not dest.exists() and part.stat().st_size == 100_000
    ds.download(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.log[-1]["range"] == "bytes=100000-"


@network
def test_download_stalled_transfer_keeps_the_partial_file(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.stall = threading.Event()
    with pytest.raises(ds.DownloadError, match=r"broke off after 1000 bytes.*next call resumes"):
        ds.download(f"{server.url}/data.bin", tmp_path / "data.bin", timeout=2.0, progress=False)
    assert (tmp_path / "data.bin.part").stat().st_size == 1000


@network
def test_download_gives_up_on_a_server_sending_wrong_ranges(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.wrong_range = True
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:100])
    with pytest.raises(ds.DownloadError, match="unexpected byte ranges"):
        ds.download(f"{server.url}/data.bin", tmp_path / "data.bin", progress=False)
    assert [r["range"] for r in server.log] == ["bytes=100-", None]
    assert not (tmp_path / "data.bin.part").exists()


@network
def test_download_http_error_names_the_url(server, tmp_path):
    url = f"{server.url}/missing.zip"
    with pytest.raises(ds.DownloadError, match=re.escape(url) + r".*HTTP 404.*save it as"):
        ds.download(url, tmp_path / "missing.zip", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part


@network
def test_download_offline(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    with pytest.raises(
        ds.DownloadError, match=re.escape(url) + r".*offline.*save it as '.*data\.zip'"
    ):
        ds.download(url, tmp_path / "data.zip", timeout=5, progress=False)
    assert isinstance(ds.DownloadError("x"), CellSegError)


def test_download_argument_errors(tmp_path):
    with pytest.raises(CellSegError, match="http"):
        ds.download("ftp://example.org/x.zip", tmp_path / "x.zip")
    with pytest.raises(CellSegError, match="sha256: expected 64"):
        ds.download("https://example.org/x.zip", tmp_path / "x.zip", sha256="abc")
    with pytest.raises(CellSegError, match="md5: expected 32"):
        ds.download("https://example.org/x.zip", tmp_path / "x.zip", md5="g" * 32)
    with pytest.raises(CellSegError, match="is a folder"):
        ds.download("https://example.org/x.zip", tmp_path)
    with pytest.raises(CellSegError, match="timeout"):
        ds.download("https://example.org/x.zip", tmp_path / "x.zip", timeout=0)
    with pytest.raises(CellSegError, match="timeout"):
        ds.download("https://example.org/x.zip", tmp_path / "x.zip", timeout="60")
    with pytest.raises(CellSegError, match="algorithm"):
        ds.file_hash(__file__, "sha1")


# --------------------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tf.addfile(info, pyio.BytesIO(member[1]))
    return path


def test_extract_zip_and_tar(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"top/images/x.txt": b"x", "top/labels/y.txt": b"y"})
    assert ds.extract(archive, tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out" / "top" / "labels" / "y.txt").read_bytes() == b"y"
    link = tarfile.TarInfo("top/link")
    link.type, link.linkname = tarfile.SYMTYPE, "x.txt"
    archive = _tar(tmp_path / "a.tar.gz", [("top/x.txt", b"tar"), link])
    ds.extract(archive, tmp_path / "tar")
    assert (tmp_path / "tar" / "top" / "x.txt").read_bytes() == b"tar"


@pytest.mark.parametrize(
    "name", ["../evil.txt", "ok/../../evil.txt", "/abs/evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_extract_refuses_zip_slip(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"evil"})
    with pytest.raises(CellSegError, match="refusing to extract member"):
        ds.extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_extract_refuses_bad_tar_members(tmp_path):
    archive = _tar(tmp_path / "dots.tar.gz", [("../evil.txt", b"evil")])
    with pytest.raises(CellSegError, match="'..'"):
        ds.extract(archive, tmp_path / "out")
    link = tarfile.TarInfo("top/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    with pytest.raises(CellSegError, match="links outside"):
        ds.extract(_tar(tmp_path / "link.tar.gz", [link]), tmp_path / "out")
    device = tarfile.TarInfo("dev")
    device.type = tarfile.CHRTYPE
    with pytest.raises(CellSegError, match="device or special"):
        ds.extract(_tar(tmp_path / "dev.tar.gz", [device]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_errors(tmp_path):
    with pytest.raises(CellSegError, match="archive not found"):
        ds.extract(tmp_path / "none.zip", tmp_path / "out")
    (tmp_path / "plain.zip").write_bytes(b"not an archive at all")
    with pytest.raises(CellSegError, match="not a zip or tar"):
        ds.extract(tmp_path / "plain.zip", tmp_path / "out")


# --------------------------------------------------------------------------------------
# DSB2018 masks -> labels
# --------------------------------------------------------------------------------------


def test_masks_to_labels_overlap_rule():
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True  # 36 px
    small = np.zeros((8, 8), bool)
    small[5:8, 5:8] = True  # 9 px, 4 of them on `big`
    empty = np.zeros((8, 8), bool)
    other = np.zeros((8, 8), np.uint8)
    other[0, 0] = 255
    labels = ds.masks_to_labels([big, empty, small, other])
    assert labels.dtype == np.int32
    assert labels[0, 0] == 3 and labels[6, 6] == 2 and labels[7, 7] == 2 and labels[2, 2] == 1
    assert (labels == 2).sum() == 9 and (labels == 1).sum() == 32
    # the order of the masks does not decide who keeps the shared pixels
    swapped = ds.masks_to_labels([small, big])
    assert (swapped == 1).sum() == 9 and (swapped == 2).sum() == 32
    covered = ds.masks_to_labels([small, small[:]])  # a twin: the first listed loses
    assert set(np.unique(covered)) == {0, 1}
    rgb = np.stack([small, empty, empty], axis=-1)
    assert (ds.masks_to_labels([rgb]) == 1).sum() == 9


def test_masks_to_labels_errors():
    with pytest.raises(CellSegError, match="empty"):
        ds.masks_to_labels([])
    with pytest.raises(CellSegError, match=r"masks\[1\]: shape"):
        ds.masks_to_labels([np.zeros((4, 4)), np.zeros((4, 5))])


def make_dsb(root: Path) -> dict[str, np.ndarray]:
    """Two DSB-style samples (RGBA images, one PNG per nucleus) and one without masks."""
    expected = {}
    rng = np.random.default_rng(0)
    for sid, boxes in {
        "aa11": [(1, 5, 2, 6), (8, 12, 8, 14)],
        "bb22": [(0, 4, 0, 4)],
        "cc33": None,
    }.items():
        rgba = np.dstack(
            [rng.integers(0, 255, (16, 18, 3), dtype=np.uint8), np.full((16, 18), 255, np.uint8)]
        )
        write_image(root / sid / "images" / f"{sid}.png", rgba)
        labels = np.zeros((16, 18), np.int32)
        for i, (r0, r1, c0, c1) in enumerate(boxes or [], start=1):
            mask = np.zeros((16, 18), np.uint8)
            mask[r0:r1, c0:c1] = 255
            (root / sid / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / sid / "masks" / f"m{i}.png")
            labels[r0:r1, c0:c1] = i
        expected[sid] = labels
    return expected


def test_convert_dsb(tmp_path):
    expected = make_dsb(tmp_path / "stage1_train")
    out = ds.convert_dsb(tmp_path / "stage1_train", tmp_path / "out", progress=False)
    samples = ds.find_pairs(out)
    assert [s.stem for s in samples] == ["aa11", "bb22", "cc33"]
    for s in samples:
        np.testing.assert_array_equal(tifffile.imread(s.label_path), expected[s.stem])
        assert (
            s.image_path.read_bytes()
            == (tmp_path / "stage1_train" / s.stem / "images" / f"{s.stem}.png").read_bytes()
        )
    # an archive with one folder around the sample folders works too
    (tmp_path / "wrapped").mkdir()
    (tmp_path / "stage1_train").rename(tmp_path / "wrapped" / "stage1_train")
    ds.convert_dsb(tmp_path / "wrapped", tmp_path / "out2", progress=False)
    assert len(ds.find_pairs(tmp_path / "out2")) == 3


def test_convert_dsb_errors(tmp_path):
    with pytest.raises(CellSegError, match="DSB folder not found"):
        ds.convert_dsb(tmp_path / "none", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CellSegError, match="no DSB sample folders"):
        ds.convert_dsb(tmp_path / "empty", tmp_path / "out")
    make_dsb(tmp_path / "src")
    (tmp_path / "src" / "aa11" / "images" / "aa11.png").rename(
        tmp_path / "src" / "aa11" / "images" / "other.png"
    )
    with pytest.raises(CellSegError, match=r"aa11\.png'?: image of DSB sample 'aa11' not found"):
        ds.convert_dsb(tmp_path / "src", tmp_path / "out", progress=False)
    make_dsb(tmp_path / "src2")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(
        tmp_path / "src2" / "bb22" / "masks" / "m9.png"
    )
    with pytest.raises(CellSegError, match=r"m9\.png'?: mask size \(5, 5\) differs"):
        ds.convert_dsb(tmp_path / "src2", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------------------
# the registry and fetch
# --------------------------------------------------------------------------------------


def test_registry_is_well_formed():
    assert set(ds.DATASETS) == {"neurips-cellseg", "bbbc038"}
    for name, spec in ds.DATASETS.items():
        assert spec.name == name and spec.licence and spec.citation
        assert spec.homepage.startswith("https://")
        assert set(spec.default_parts) <= set(spec.files)
        for remote in spec.files.values():
            assert remote.url.startswith("https://") and remote.filename in remote.url
            assert remote.checksum_source  # where the checksum comes from, or that none exists
            if remote.checksum is not None:
                algorithm, value = remote.checksum.split(":")
                assert re.fullmatch(
                    {"sha256": "[0-9a-f]{64}", "md5": "[0-9a-f]{32}"}[algorithm], value
                )
    assert ds.DATASETS["bbbc038"].files["train"].checksum is None  # the BBBC publishes none


def _serve_dataset(monkeypatch, server, name, part, archive: bytes, checksum):
    spec = ds.DATASETS[name]
    remote = replace(
        spec.files[part], url=f"{server.url}/{spec.files[part].filename}", checksum=checksum
    )
    monkeypatch.setitem(
        ds.DATASETS, name, replace(spec, files={part: remote}, default_parts=(part,))
    )
    server.files[f"/{remote.filename}"] = archive


def _zip_folder(folder: Path, arcroot: str = "") -> bytes:
    buffer = pyio.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{arcroot}{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


@network
def test_fetch_bbbc038_end_to_end(server, tmp_path, monkeypatch):
    expected = make_dsb(tmp_path / "dsb")
    archive = _zip_folder(tmp_path / "dsb")
    _serve_dataset(monkeypatch, server, "bbbc038", "train", archive, None)
    root = tmp_path / "data"
    with pytest.warns(UserWarning, match="no checksum is published.*trust on first use"):
        (folder,) = ds.fetch("bbbc038", root, progress=False)
    assert folder == root / "bbbc038-stage1_train"
    samples = ds.find_pairs(folder)
    assert {s.stem: tifffile.imread(s.label_path).max() for s in samples} == {
        "aa11": 2,
        "bb22": 1,
        "cc33": 0,
    }
    np.testing.assert_array_equal(tifffile.imread(samples[0].label_path), expected["aa11"])
    sidecar = root / "stage1_train.zip.sha256"
    assert sidecar.read_text().split()[0] == hashlib.sha256(archive).hexdigest()
    assert sorted(p.name for p in root.iterdir()) == [
        "bbbc038-stage1_train",
        "stage1_train.zip.sha256",
    ]
    # a second call finds the folder and does not download
    n = len(server.log)
    assert ds.fetch("bbbc038", root, progress=False) == [folder]
    assert len(server.log) == n
    # a later download is checked against the recorded SHA-256
    shutil.rmtree(folder)
    server.files["/stage1_train.zip"] = archive[:-10] + b"0123456789"
    with pytest.raises(ds.DownloadError, match="sha256"):
        ds.fetch("bbbc038", root, progress=False)
    server.files["/stage1_train.zip"] = archive
    assert ds.fetch("bbbc038", root, progress=False, keep_archives=True) == [folder]
    assert (root / "stage1_train.zip").read_bytes() == archive


@network
def test_fetch_challenge_layout(server, tmp_path, monkeypatch):
    make_layout(
        tmp_path / "src",
        {"cell_00001.bmp": "cell_00001_label.tiff", "cell_00002.png": "cell_00002_label.tiff"},
    )
    archive = _zip_folder(tmp_path / "src", "Training-labeled/")
    _serve_dataset(
        monkeypatch,
        server,
        "neurips-cellseg",
        "train",
        archive,
        "sha256:" + hashlib.sha256(archive).hexdigest(),
    )
    (folder,) = ds.fetch("neurips-cellseg", tmp_path / "data", progress=False)
    assert folder == tmp_path / "data" / "Training-labeled"
    assert [s.stem for s in ds.find_pairs(folder)] == ["cell_00001", "cell_00002"]
    assert not (tmp_path / "data" / "Training-labeled.zip").exists()


@network
def test_fetch_archive_without_the_expected_folder(server, tmp_path, monkeypatch):
    archive = _zip(tmp_path / "x.zip", {"Something-else/images/a.png": b"x"}).read_bytes()
    _serve_dataset(
        monkeypatch,
        server,
        "neurips-cellseg",
        "tuning",
        archive,
        "md5:" + hashlib.md5(archive).hexdigest(),
    )
    with pytest.raises(CellSegError, match="has no folder 'Tuning'"):
        ds.fetch("neurips-cellseg", tmp_path / "data", progress=False)
    assert not any(p.name.endswith(".extracting") for p in (tmp_path / "data").iterdir())


@network
def test_fetch_refuses_to_overwrite_a_folder(server, tmp_path, monkeypatch):
    make_layout(tmp_path / "src", {"a.png": "a_label.tiff"})
    archive = _zip_folder(tmp_path / "src", "Testing/Public/")
    _serve_dataset(monkeypatch, server, "neurips-cellseg", "test", archive, None)
    (tmp_path / "data" / "Testing").mkdir(parents=True)  # but no Testing/Public inside
    with (
        pytest.warns(UserWarning, match="trust on first use"),
        pytest.raises(CellSegError, match="Testing'?: already exists"),
    ):
        ds.fetch("neurips-cellseg", tmp_path / "data", progress=False)


def test_fetch_malformed_registry_checksum(tmp_path, monkeypatch):
    spec = ds.DATASETS["bbbc038"]
    remote = replace(spec.files["train"], checksum="crc32:1234")
    monkeypatch.setitem(ds.DATASETS, "bbbc038", replace(spec, files={"train": remote}))
    with pytest.raises(CellSegError, match=r"DATASETS\['bbbc038'\].*'crc32:1234'"):
        ds.fetch("bbbc038", tmp_path, progress=False)


def test_fetch_argument_errors(tmp_path):
    with pytest.raises(CellSegError, match="unknown data set 'mnist'.*bbbc038.*neurips-cellseg"):
        ds.fetch("mnist", tmp_path)
    with pytest.raises(
        CellSegError, match="parts: neurips-cellseg has the parts train, tuning, test"
    ):
        ds.fetch("neurips-cellseg", tmp_path, parts=["training"])
    with pytest.raises(CellSegError, match="parts"):
        ds.fetch("neurips-cellseg", tmp_path, parts=[])
