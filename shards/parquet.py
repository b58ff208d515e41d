"""Parquet files laid out as Hugging Face datasets publish them: an image column and an integer label column.

The image column is either a struct with ``bytes`` (and ``path``) fields, the ``datasets.Image`` feature,
or plain binary. Class names come from the ``huggingface`` schema metadata (a ``ClassLabel`` feature) when
the file carries it. Files are only ever read a row group at a time, whatever their size: the listing
reads the label column alone, and a shard task reads the image column of the row groups its rows lie in,
keeping just those rows (so a task holds one row group plus its own shard's images).

A row that cannot become a sample (no image bytes, a label out of range) is a skipped input with its
reason, like an unreadable file of an image folder.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterssl.errors import ShardsError
from clusterssl.shards.format import UNLABELLED
from clusterssl.shards.images import BadInput
from clusterssl.shards.sources import InputItem, Listing, Source

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

BATCH_ROWS = 256
"""Rows per record batch when streaming a row group: bounds memory even in a file of one huge group."""
READ_BUFFER = 1 << 20
"""Column chunks are read through a buffer of this size instead of whole (pyarrow's ``buffer_size``)."""


def parquet_files(paths: Sequence[str | Path]) -> list[Path]:
    """The ``.parquet`` files named, or found (recursively, sorted) in the directories named."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise ShardsError(f"no .parquet files in {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ShardsError(f"Parquet source does not exist: {path}")
    if len(set(files)) != len(files):
        raise ShardsError("a Parquet file is named more than once")
    return files


class _File:
    """One Parquet file's reader and the first row of each of its row groups."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            self.reader: pq.ParquetFile = pq.ParquetFile(path, buffer_size=READ_BUFFER, pre_buffer=False)
        except (OSError, ValueError) as error:  # ArrowInvalid is a ValueError
            raise ShardsError(f"cannot read {path} as Parquet: {error}") from None
        metadata = self.reader.metadata
        self.starts = [0]
        for group in range(metadata.num_row_groups):
            self.starts.append(self.starts[-1] + metadata.row_group(group).num_rows)

    def group_of(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1


class ParquetSource(Source):
    """Rows of one or more Parquet files; references are ``<file relative to the common folder>/<row>``."""

    kind = "parquet"

    def __init__(
        self, paths: Sequence[str | Path], image_column: str = "image", label_column: str = "label"
    ) -> None:
        self.files = parquet_files(paths)
        parents = [str(f.resolve().parent) for f in self.files]
        self.root = Path(os.path.commonpath(parents))
        self.names = [f.resolve().relative_to(self.root).as_posix() for f in self.files]
        self.image_column = image_column
        self.label_column = label_column
        self._open: dict[int, _File] = {}
        self._classes: list[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # readers hold file handles: each worker process opens its own
        return {**self.__dict__, "_open": {}}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.root),
            "files": self.names,
            "image_column": self.image_column,
            "label_column": self.label_column,
        }

    def _file(self, number: int) -> _File:
        if number not in self._open:
            opened = _File(self.files[number])
            self._check_columns(opened, self.files[number])
            self._open[number] = opened
        return self._open[number]

    def _check_columns(self, opened: _File, path: Path) -> None:
        schema = opened.reader.schema_arrow
        for column, option in ((self.image_column, "--image-column"), (self.label_column, "--label-column")):
            if column not in schema.names:
                raise ShardsError(
                    f"{path} has no column {column!r} (columns: {', '.join(schema.names)}); "
                    f"name it with {option}"
                )
        image_type = schema.field(self.image_column).type
        if not _is_binary(image_type) and not (
            _is_struct(image_type) and image_type.get_field_index("bytes") >= 0
        ):
            raise ShardsError(
                f"{path}: column {self.image_column!r} is {image_type}; expected binary or a struct "
                "with a 'bytes' field (Hugging Face's Image feature)"
            )
        label_type = schema.field(self.label_column).type
        if not _is_integer(label_type):
            raise ShardsError(
                f"{path}: label column {self.label_column!r} is {label_type}; expected integers"
            )

    def list_inputs(self) -> Listing:
        names = self._class_names()
        items = []
        for number, name in enumerate(self.names):
            opened = self._file(number)
            width = len(str(opened.starts[-1] - 1))
            metadata = opened.reader.metadata
            row = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                size = metadata.row_group(group).total_byte_size // max(rows, 1)
                for label in self._labels(opened, group):
                    valid = label is not None and label >= 0 and (names is None or label < len(names))
                    # an invalid label lists as unlabelled; reading the row skips it with the reason
                    items.append(InputItem(f"{name}/{row:0{width}d}", label if valid else UNLABELLED, size))
                    row += 1
        if not items:
            raise ShardsError(f"no rows in {', '.join(self.names)}")
        classes = names
        if classes is None:
            top = max(item.label for item in items)
            classes = [str(c) for c in range(top + 1)]
        return Listing(sorted(items, key=lambda item: item.ref), classes)

    def _labels(self, opened: _File, group: int) -> Iterator[int | None]:
        for batch in opened.reader.iter_batches(
            batch_size=BATCH_ROWS, row_groups=[group], columns=[self.label_column]
        ):
            yield from batch.column(0).to_pylist()

    def _class_names(self) -> list[str] | None:
        """``ClassLabel`` names of the label column from the first file's ``huggingface`` metadata."""
        if self._classes is None:
            metadata = self._file(0).reader.schema_arrow.metadata or {}
            self._classes = huggingface_class_names(metadata.get(b"huggingface"), self.label_column) or []
        return self._classes or None

    def read(self, ref: str) -> bytes:
        return self.reader_for([ref]).read(ref)

    def reader_for(self, refs: Sequence[str]) -> _Rows:
        """The rows ``refs`` name, read row group by row group (each group once, image column only)."""
        wanted: dict[tuple[int, int], list[int]] = defaultdict(list)
        number_of = {name: n for n, name in enumerate(self.names)}
        for ref in refs:
            name, _, row = ref.rpartition("/")
            opened = self._file(number_of[name])
            wanted[(number_of[name], opened.group_of(int(row)))].append(int(row))
        found: dict[str, bytes | BadInput] = {}
        limit = len(self._class_names() or []) or None
        for (number, group), rows in sorted(wanted.items()):
            opened = self._file(number)
            wanted_rows = sorted(rows)
            width = len(str(opened.starts[-1] - 1))
            first = opened.starts[group]
            for batch in opened.reader.iter_batches(
                batch_size=BATCH_ROWS, row_groups=[group], columns=[self.image_column, self.label_column]
            ):
                # the wanted rows inside this batch, as positions in it
                low = bisect.bisect_left(wanted_rows, first)
                high = bisect.bisect_left(wanted_rows, first + batch.num_rows)
                positions = [row - first for row in wanted_rows[low:high]]
                if positions:
                    taken = batch.take(positions)
                    cells, labels = taken.column(0).to_pylist(), taken.column(1).to_pylist()
                    for position, cell, label in zip(positions, cells, labels, strict=True):
                        ref = f"{self.names[number]}/{first + position:0{width}d}"
                        found[ref] = _row_bytes(cell, label, limit, self.image_column)
                first += batch.num_rows
        return _Rows(found)


class _Rows:
    """The image bytes (or why there are none) of the rows a shard task asked for."""

    def __init__(self, found: dict[str, bytes | BadInput]) -> None:
        self.found = found

    def read(self, ref: str) -> bytes:
        value = self.found.pop(ref)  # each row is written once: free it as soon as it is taken
        if isinstance(value, BadInput):
            raise value
        return value


def _row_bytes(cell: object, label: int | None, limit: int | None, column: str) -> bytes | BadInput:
    if label is not None and (label < 0 or (limit is not None and label >= limit)):
        names = f" (the metadata names {limit} classes)" if limit is not None else ""
        return BadInput(f"label {label} is out of range{names}")
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data is None:
            path = cell.get("path")
            return BadInput(
                f"no image bytes in column {column!r}" + (f" (only the path {path!r})" if path else "")
            )
        return data
    if cell is None:
        return BadInput(f"no image in column {column!r} (null)")
    return cell  # type: ignore[return-value]


def huggingface_class_names(raw: bytes | None, label_column: str) -> list[str] | None:
    """The names of a ``ClassLabel`` feature in the ``huggingface`` schema metadata, if it has one."""
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    features = info.get("info", {}).get("features", {}) if isinstance(info, dict) else {}
    feature = features.get(label_column) if isinstance(features, dict) else None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names) and names:
        return names
    return None


def _is_binary(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _is_struct(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_struct(kind))


def _is_integer(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind))
