"""Where the images come from: a class-per-folder tree, a CSV/JSONL list, or scikit-learn's digits.

A source lists its inputs deterministically (sorted, so the same data always plans the same shards) and
reads one input's encoded bytes by its reference. Sources are small picklable objects that travel with
each shard task to a worker process; the workers read (or, for digits, render) the images themselves, so
image bytes never travel through a pipe.
"""

from __future__ import annotations

import csv
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from clusterssl.errors import ShardsError
from clusterssl.shards.format import UNLABELLED
from clusterssl.shards.images import IMAGE_EXTENSIONS, is_image_file, render_digit

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np


@dataclass(frozen=True, slots=True)
class InputItem:
    """One input: how it is named (manifest, ``src`` component), its label, its size for shard planning."""

    ref: str
    label: int
    size: int
    """Bytes on disk; an estimate for generated inputs (it only steers ``--bytes-per-shard``)."""


@dataclass(frozen=True)
class Listing:
    items: list[InputItem]
    classes: list[str]
    """Class id ``i`` is ``classes[i]``; empty when no input is labelled."""
    notes: list[str] = field(default_factory=list)
    """What the listing changed that the user should hear about (kept in the manifest's ``notes``)."""


class InputReader(Protocol):
    def read(self, ref: str) -> bytes: ...


class Source(ABC):
    """A dataset to convert. Subclasses must stay picklable (they are sent to the worker processes)."""

    kind: ClassVar[str]

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What identifies this source in the manifest's parameters (kind, resolved path, options)."""

    @abstractmethod
    def list_inputs(self) -> Listing:
        """Every input, sorted; raises ``ShardsError`` when the source is missing or empty."""

    @abstractmethod
    def read(self, ref: str) -> bytes:
        """The encoded bytes of one input; raises ``OSError`` when it cannot be read."""

    def reader_for(self, refs: Sequence[str]) -> InputReader:
        """What reads the inputs of one shard task, each once, in this order. Sources that read many
        inputs from one container (a Parquet row group) override it to read each container once."""
        return self

    def walked_directory(self) -> Path | None:
        """The directory tree the listing walks, if any: output written inside it would become input."""
        return None

    def file_root(self) -> str | None:
        """The folder relative references name files in, when ``read(ref)`` is exactly reading that file
        whole (an absolute reference is the file itself); None for generated inputs. Lets the converter
        read the files in C (``shards.native``)."""
        return None


_EXTENSIONS_TEXT = ", ".join(sorted(IMAGE_EXTENSIONS))


class ImageFolderSource(Source):
    """``DIR/<class>/**/<image>``: one subfolder per class, class ids in sorted folder-name order.

    References are paths relative to ``DIR`` (``cat/0001.jpg``). Files whose extension is not an image
    extension (case-insensitive) are not inputs; hidden folders are ignored.
    """

    kind = "imagefolder"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root.resolve())}

    def list_inputs(self) -> Listing:
        root = self.root
        if not root.exists():
            raise ShardsError(f"source directory does not exist: {root}")
        if not root.is_dir():
            raise ShardsError(f"imagefolder source is not a directory: {root}")
        entries = _scan(root)
        class_dirs = sorted(e.name for e in entries if _is_dir(e) and not e.name.startswith("."))
        stray = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
        if stray:
            raise ShardsError(
                f"{len(stray)} image(s) lie directly in {root} (e.g. {stray[0]}), outside any class "
                "folder; imagefolder expects DIR/<class>/<image>"
            )
        items = []
        # The root and the class folders count as walked from the start: a link back to one of them
        # (``cat/loop -> ..``, ``cat/more -> ../dog``) is not walked again under another name.
        visited = {_directory_key(root)} | {_directory_key(root / name) for name in class_dirs}
        for class_id, name in enumerate(class_dirs):
            images = _walk_images(root / name, name, visited)
            items.extend(InputItem(ref, class_id, size) for ref, size in images)
        if not items:
            raise ShardsError(f"no images found in {root} (looked for {_EXTENSIONS_TEXT} in class folders)")
        return Listing(items, class_dirs)

    def read(self, ref: str) -> bytes:
        return read_file(os.path.join(self.root, ref))

    def file_root(self) -> str | None:
        # a subclass that reads differently (slowed down in tests, decrypting...) keeps its own read
        return str(self.root) if type(self).read is ImageFolderSource.read else None

    def walked_directory(self) -> Path | None:
        return self.root


def read_file(path: str | Path) -> bytes:
    """A whole file, read with plain system calls: one ``read`` of the size ``fstat`` gives, plus one.

    Getting exactly that size means the end was reached (one read, no join); a file that grew since
    ``fstat``, or a file system that returns short reads (FUSE, network mounts), is read on to its end.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError as error:
        raise ShardsError(f"cannot list {directory}: {error.strerror or error}") from None


def _walk_images(directory: Path, prefix: str, visited: set[tuple[int, int]]) -> list[tuple[str, int]]:
    """``(ref, size)`` of every image below ``directory``, sorted by ref; refs are ``prefix/…`` posix paths.

    Links to directories are followed, each directory at most once (``visited`` holds the
    ``(st_dev, st_ino)`` of those walked), so a link loop ends instead of nesting 40 levels deep. An
    image-named entry that cannot even be stat'ed (a link to itself) is listed all the same: reading it
    fails, and it is skipped with that reason like any unreadable input.
    """
    found = []
    # in name order, so which of two links to one folder is walked does not depend on the file system
    for entry in sorted(_scan(directory), key=lambda e: e.name):
        ref = f"{prefix}/{entry.name}"
        if _is_dir(entry):
            if entry.name.startswith("."):
                continue
            key = _directory_key(Path(entry.path))
            if key not in visited:
                visited.add(key)
                found.extend(_walk_images(Path(entry.path), ref, visited))
        elif is_image_file(entry.name):
            found.append((ref, _size(entry)))
    return sorted(found)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a directory or a link to one; False for a link that cannot be resolved."""
    try:
        return entry.is_dir()
    except OSError:  # a link loop (ELOOP) or an unreadable target: not a directory to walk
        return False


def _directory_key(directory: Path) -> tuple[int, int]:
    try:
        status = directory.stat()
    except OSError as error:
        raise ShardsError(f"cannot list {directory}: {error.strerror or error}") from None
    return status.st_dev, status.st_ino


def _size(entry: os.DirEntry[str] | Path) -> int:
    try:
        return entry.stat().st_size
    except OSError:
        return 0  # unreadable or dangling: the worker records why when it tries to read it


class ListSource(Source):
    """A CSV (header ``path[,label]``) or JSONL (``{"path": …, "label": …}``) list of images.

    Relative paths are resolved against the list file's folder. Labels are optional: all-integer labels
    are kept as class ids (``-1`` or a missing label means unlabelled), any other labels are names whose
    sorted order gives the ids; a list that mixes the two kinds is refused (``10`` among names would
    silently become a name sorted as text). Integer ids name the classes ``0..max``, so an id above
    ``max_class_id(inputs)`` is refused rather than turned into millions of empty classes: sparse or huge
    ids belong in the list as names. References are the paths as written in the list; an entry naming
    the same file as an earlier one (after resolving links and ``..``) is left out, with a note.
    """

    kind = "list"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve())}

    def list_inputs(self) -> Listing:
        if not self.path.exists():
            raise ShardsError(f"list file does not exist: {self.path}")
        if not self.path.is_file():
            raise ShardsError(f"list source is not a file: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            rows = self._read_csv()
        elif suffix in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ShardsError(f"list file must end in .csv or .jsonl: {self.path}")
        if not rows:
            raise ShardsError(f"list file has no entries: {self.path}")
        rows, duplicates = _first_of_each_file(rows, self._resolve)
        labels, classes = _label_ids(rows, self.path)
        items = [
            InputItem(ref, label, _size(self._resolve(ref)))
            for ref, label in sorted(zip((r for r, _ in rows), labels, strict=True))
        ]
        notes = []
        if duplicates:
            notes.append(
                f"{duplicates} entr{'y' if duplicates == 1 else 'ies'} of {self.path.name} named a file listed "
                "before (after resolving links and '..') and were left out; the first entry of each is kept"
            )
        return Listing(items, classes, notes)

    def read(self, ref: str) -> bytes:
        return read_file(self._resolve(ref))

    def file_root(self) -> str | None:
        return str(self.path.parent) if type(self).read is ListSource.read else None

    def _resolve(self, ref: str) -> Path:
        path = Path(ref)
        return path if path.is_absolute() else self.path.parent / path

    def _read_csv(self) -> list[tuple[str, object]]:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise ShardsError(f"{self.path}: a CSV list needs a header line with a 'path' column")
                rows = []
                for line, row in enumerate(reader, start=2):
                    path = (row.get("path") or "").strip()
                    if not path:
                        raise ShardsError(f"{self.path} line {line}: empty path")
                    label = (row.get("label") or "").strip()
                    rows.append((path, label or None))
                return rows
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ShardsError(f"cannot read {self.path}: {error}") from None

    def _read_jsonl(self) -> list[tuple[str, object]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ShardsError(f"cannot read {self.path}: {error}") from None
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ShardsError(f"{self.path} line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not record["path"]:
                raise ShardsError(f'{self.path} line {number}: expected an object with a "path" string')
            rows.append((record["path"], record.get("label")))
        return rows


def _first_of_each_file(
    rows: list[tuple[str, object]], resolve: Callable[[str], Path]
) -> tuple[list[tuple[str, object]], int]:
    """The rows whose file was not named by an earlier row, and how many were dropped: a file written
    twice counts twice in training and, with a hold-out, can land in both train and val."""
    seen: set[str] = set()
    kept = []
    for ref, label in rows:
        key = os.path.realpath(resolve(ref))
        if key not in seen:
            seen.add(key)
            kept.append((ref, label))
    return kept, len(rows) - len(kept)


CLASS_IDS_PER_INPUT = 10
MIN_CLASS_ID_SPACE = 100_000
"""Integer labels are class ids ``0..max``: ``max`` may reach ``max(MIN_CLASS_ID_SPACE,
CLASS_IDS_PER_INPUT × inputs) − 1`` (ImageNet-21k's 21,841 classes fit, sparse ids from a large
taxonomy mostly do); beyond that they would only make empty classes (10^12 of them exhaust memory)."""


def max_class_id(inputs: int) -> int:
    """The largest integer label a list of ``inputs`` entries may use (and never above 2^31 − 1)."""
    return min(max(MIN_CLASS_ID_SPACE, CLASS_IDS_PER_INPUT * inputs), 2**31) - 1


def _label_ids(rows: list[tuple[str, object]], where: Path) -> tuple[list[int], list[str]]:
    """Class ids and class names for a list's ``(ref, raw label)`` rows (None = unlabelled)."""
    first_int: tuple[str, object] | None = None
    first_name: tuple[str, object] | None = None
    parsed: list[int | None] = []
    for ref, label in rows:
        if label is not None and (isinstance(label, bool) or not isinstance(label, int | str)):
            raise ShardsError(f"{where}: labels must be integers or strings, got {label!r} for {ref}")
        value = None if label is None else _as_int(label)
        if label is not None and value is None:
            first_name = first_name or (ref, label)
        elif value is not None:
            first_int = first_int or (ref, label)
        parsed.append(value)
    if first_int is not None and first_name is not None:
        raise ShardsError(
            f"{where}: labels mix integers and names (e.g. {first_int[1]!r} for {first_int[0]} and "
            f"{first_name[1]!r} for {first_name[0]}); use class ids 0..K-1 everywhere or names everywhere"
        )
    if first_name is None:
        return _integer_ids(rows, parsed, where), _integer_class_names(parsed)
    names = sorted({str(label) for _, label in rows if label is not None})
    position = {name: i for i, name in enumerate(names)}
    return [UNLABELLED if label is None else position[str(label)] for _, label in rows], names


def _integer_ids(rows: list[tuple[str, object]], parsed: list[int | None], where: Path) -> list[int]:
    ids = [UNLABELLED if value is None else value for value in parsed]
    limit = max_class_id(len(rows))
    for (ref, _), value in zip(rows, ids, strict=True):
        if value < UNLABELLED:
            raise ShardsError(
                f"{where}: integer labels must be >= 0 (or -1 for unlabelled), got {value} for {ref}"
            )
        if value > limit:
            raise ShardsError(
                f"{where}: label {value} for {ref} is above {limit}, the largest class id a list of "
                f"{len(rows)} entries may use (integer labels are class ids 0..K-1); give sparse or large "
                f"ids as names (e.g. 'n{value}') instead"
            )
    return ids


def _integer_class_names(parsed: list[int | None]) -> list[str]:
    labelled = [value for value in parsed if value is not None and value != UNLABELLED]
    return [str(i) for i in range(max(labelled) + 1)] if labelled else []


def _as_int(label: object) -> int | None:
    if isinstance(label, int):
        return label
    text = str(label).strip()
    try:
        return int(text)
    except ValueError:
        return None


class DigitsSource(Source):
    """scikit-learn's 1,797 handwritten digits (8×8, 0..16), rendered as ``image_size``² RGB JPEGs.

    Labels 0..9. The raw pixels (115 KB) travel with the source to the workers, which render the JPEGs
    (so workers need not import scikit-learn); references are ``digits/<row>``.
    """

    kind = "digits"
    JPEG_QUALITY = 95

    def __init__(self, image_size: int = 32) -> None:
        if image_size < 8:
            raise ShardsError(f"digits --image-size must be at least 8, got {image_size}")
        self.image_size = image_size
        self._pixels: np.ndarray | None = None
        self._targets: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size, "jpeg_quality": self.JPEG_QUALITY}

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._pixels is None or self._targets is None:
            import numpy as np
            from sklearn.datasets import load_digits  # 1 s import: only where digits are used

            digits = load_digits()
            self._pixels = digits.data.astype(np.uint8)
            self._targets = digits.target.astype(np.int64)
        return self._pixels, self._targets

    def list_inputs(self) -> Listing:
        _, targets = self._load()
        # About one byte per pixel for these small, smooth JPEGs; only used to plan --bytes-per-shard.
        estimate = self.image_size * self.image_size
        items = [InputItem(f"digits/{row:04d}", int(t), estimate) for row, t in enumerate(targets)]
        return Listing(items, [str(d) for d in range(10)])

    def read(self, ref: str) -> bytes:
        pixels, _ = self._load()
        row = int(ref.rsplit("/", 1)[1])
        return render_digit(pixels[row], self.image_size, self.JPEG_QUALITY)


SOURCE_KINDS = ("digits", "imagefolder", "list", "idx")


def open_source(kind: str, location: str | Path | None = None, *, image_size: int = 32) -> Source:
    """Build a source by name: ``imagefolder DIR``, ``list FILE``, ``idx IMAGES_FILE`` (its label file
    beside it) or ``digits``."""
    if kind == "digits":
        return DigitsSource(image_size)
    if kind == "idx":
        from clusterssl.shards.idx import IdxSource, labels_for

        if location is None or not Path(location).is_file():
            raise ShardsError(f"the idx source needs an '*-images-idx3-ubyte[.gz]' file, got {location}")
        return IdxSource(location, labels_for(Path(location)))
    if kind in ("imagefolder", "list"):
        if location is None:
            raise ShardsError(f"the {kind} source needs a path")
        return ImageFolderSource(location) if kind == "imagefolder" else ListSource(location)
    raise ShardsError(f"unknown source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}")
