"""``manifest.json``: what a shard set holds, written last by a conversion and trusted by every reader.

{
  "format_version": 1,
  "count": N,                       # samples in the set; global indices are 0..N-1
  "classes": ["cat", "dog"],        # class id i is classes[i]; [] when unlabelled
  "class_counts": [600, 400],       # samples per class id (unlabelled ones: count - sum); [] if unknown
  "shards": [{"file": "shard-000000.tar", "index_file": "shard-000000.idx", "count": 1000,
              "bytes": 52428800, "sha256": "…", "index_range": [0, 1000]}, …],   # index_range is [start, stop)
  "skipped": [{"input": "train/cat/x.jpg", "reason": "not an image: cannot identify image file"}],
  "notes": ["2 duplicate input(s) in the list were written once"],   # what else a user should know
  "large_images": {"side_above": 4096, "count": 3, "largest_side": 12000},  # absent in older manifests
  "params": {...}                   # the conversion's parameters (source, seed, shard size, …)
}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusterssl.errors import ShardsError
from clusterssl.shards.format import FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS


@dataclass(frozen=True)
class ShardEntry:
    file: str
    index_file: str
    count: int
    bytes: int
    sha256: str
    index_range: tuple[int, int]
    """Global indices [start, stop) held by this shard."""


@dataclass(frozen=True)
class Skipped:
    input: str
    reason: str


@dataclass(frozen=True)
class LargeImages:
    """How many stored images have a side above ``side_above`` pixels, and the longest such side."""

    side_above: int
    count: int
    largest_side: int


@dataclass
class Manifest:
    count: int
    classes: list[str]
    shards: list[ShardEntry]
    skipped: list[Skipped] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    class_counts: list[int] = field(default_factory=list)
    """Samples per class id, aligned with ``classes``; empty when not recorded."""
    notes: list[str] = field(default_factory=list)
    large_images: LargeImages | None = None
    """None when not recorded (manifests written before it was)."""
    format_version: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False)
    """The directory the manifest was loaded from (not stored)."""

    def shard_paths(self) -> list[Path]:
        """Absolute paths of the tar files, in manifest order (needs ``root``)."""
        root = self._require_root()
        return [root / shard.file for shard in self.shards]

    def index_paths(self) -> list[Path]:
        root = self._require_root()
        return [root / shard.index_file for shard in self.shards]

    def _require_root(self) -> Path:
        if self.root is None:
            raise ShardsError("this manifest was not loaded from a directory, so its shard paths are unknown")
        return self.root

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data["shards"] = [{**s, "index_range": list(s["index_range"])} for s in data["shards"]]
        return {"format_version": data.pop("format_version"), **data}

    def content_hash(self) -> str:
        """A short hash identifying the data (counts, classes, shard checksums), for tags and bank metadata."""
        payload = json.dumps(
            {"count": self.count, "classes": self.classes, "shards": [s.sha256 for s in self.shards]},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` atomically (temp file, fsync, rename)."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path | None = None) -> Manifest:
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ShardsError(
                f"manifest format version {version!r} is not supported (this clusterssl reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}; it writes {FORMAT_VERSION})"
            )
        try:
            return cls(
                count=int(data["count"]),
                classes=[str(c) for c in data["classes"]],
                shards=[
                    ShardEntry(
                        file=_plain_file_name(s["file"]),
                        index_file=_plain_file_name(s["index_file"]),
                        count=int(s["count"]),
                        bytes=int(s["bytes"]),
                        sha256=s["sha256"],
                        index_range=(int(s["index_range"][0]), int(s["index_range"][1])),
                    )
                    for s in data["shards"]
                ],
                skipped=[Skipped(str(s["input"]), str(s["reason"])) for s in data.get("skipped", [])],
                params=dict(data.get("params", {})),
                class_counts=[int(c) for c in data.get("class_counts", [])],
                notes=[str(note) for note in data.get("notes", [])],
                large_images=_large_images(data.get("large_images")),
                format_version=version,
                root=root,
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ShardsError(f"malformed manifest: {error!r}") from None


def _plain_file_name(name: Any) -> str:
    """A shard or index file name as the manifest gives it, refused unless it names a file inside the
    set's directory: the names become paths, and a manifest from elsewhere must not reach outside."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or any(not character.isprintable() for character in name)
    ):
        raise ShardsError(
            f"manifest names the file {name!r}, which is not a plain file name in the set's directory"
        )
    return name


def _large_images(data: Any) -> LargeImages | None:
    if data is None:
        return None
    return LargeImages(int(data["side_above"]), int(data["count"]), int(data["largest_side"]))


def manifest_path(location: str | Path) -> Path:
    """``DIR/manifest.json`` for a directory, the path itself for a file."""
    location = Path(location)
    return location / MANIFEST_NAME if location.is_dir() else location


def load_manifest(location: str | Path) -> Manifest:
    """Load a shard set's manifest from its directory (or the manifest file itself)."""
    path = manifest_path(location)
    if not path.exists():
        raise ShardsError(f"no shard set at {location}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ShardsError(f"cannot read {path}: {error}") from None
    return Manifest.from_json(data, root=path.parent.resolve())


def find_shard_sets(location: str | Path) -> list[Path]:
    """The shard sets at ``location``: itself when it holds a manifest, else its subfolders that do
    (``OUT/train`` and ``OUT/val`` after a hold-out conversion), in sorted order."""
    location = Path(location)
    if not location.exists():
        raise ShardsError(f"no such file or directory: {location}")
    if manifest_path(location).is_file():
        return [location]
    if location.is_dir():
        found = sorted(p for p in location.iterdir() if (p / MANIFEST_NAME).is_file())
        if found:
            return found
    raise ShardsError(f"no shard set at {location}: no {MANIFEST_NAME} in it or in its subfolders")
