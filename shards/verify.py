"""Checking a shard set against its manifest, and describing it (``shards verify`` / ``shards info``).

Per shard (in parallel): the file's size and sha256 against the manifest; the tar's headers parsed here
(checksums, bounds, end marker); the DALI index equal to what the tar holds (extension, offset, size and
name of every member); every sample complete, ``cls`` equal to ``label``, labels within the classes,
index ``range_start + position``; every image decodes. Over the set: counts add up, index ranges are
contiguous, and every index 0..N-1 occurs exactly once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clusterssl.shards.format import (
    CLASS_EXT,
    COMPONENT_ORDER,
    FORMAT_VERSION,
    IMAGE_EXT,
    INDEX_EXT,
    LABEL_EXT,
    UNLABELLED,
    decode_int,
    sample_key,
    stored_ext,
)
from clusterssl.shards.images import BadInput, decode_rgb
from clusterssl.shards.manifest import Manifest, ShardEntry, load_manifest
from clusterssl.shards.parallel import TaskRunner
from clusterssl.shards.tario import (
    REGULAR_FILE_TYPES,
    IndexComponent,
    TarMember,
    read_dali_index,
    read_tar_members,
)


@dataclass(frozen=True)
class Problem:
    """Something wrong with a shard set; ``shard``/``sample`` name where (None: the set as a whole)."""

    message: str
    shard: str | None = None
    sample: str | None = None

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.shard, self.sample and f"sample {self.sample}") if part)
        return f"{where}: {self.message}" if where else self.message


@dataclass(frozen=True)
class _ShardTask:
    tar_path: str
    index_path: str
    entry: ShardEntry
    num_classes: int
    decode: bool
    format_version: int = FORMAT_VERSION


@dataclass
class _ShardCheck:
    file: str
    indices: list[int] = field(default_factory=list)
    labels: Counter[int] = field(default_factory=Counter)
    decoded: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class VerifyReport:
    directory: Path
    count: int
    shards: int
    samples_read: int
    images_decoded: int
    problems: list[Problem]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems if p.shard})

    def to_json(self, max_problems: int = 200) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "ok": self.ok,
            "count": self.count,
            "shards": self.shards,
            "samples_read": self.samples_read,
            "images_decoded": self.images_decoded,
            "bad_shards": self.bad_shards(),
            "problem_count": len(self.problems),
            "problems": [str(p) for p in self.problems[:max_problems]],
            "warnings": self.warnings,
        }

    def render(self, max_problems: int = 20) -> str:
        head = f"{self.directory}: {self.shards} shards, {self.count} samples in the manifest"
        if self.ok:
            lines = [
                f"OK  {head}",
                f"    sizes and sha256 match, DALI indexes match their tars, indices 0..{self.count - 1} "
                f"each exactly once, {self.images_decoded} images decode",
            ]
        else:
            lines = [f"BAD {head}: {len(self.problems)} problem(s) in {len(self.bad_shards())} shard(s)"]
            lines += [f"    {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    … and {len(self.problems) - max_problems} more (--json lists them)")
        lines += [f"    warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def verify(
    location: str | Path, workers: int = 1, decode: bool = True, progress: bool = False
) -> VerifyReport:
    """Verify one shard set (its directory or manifest file). Raises ShardsError only when there is no
    readable manifest; everything wrong with the data is a ``Problem`` in the report."""
    from tqdm import tqdm

    manifest = load_manifest(location)
    assert manifest.root is not None
    tasks = [
        _ShardTask(str(tar), str(idx), entry, len(manifest.classes), decode, manifest.format_version)
        for entry, tar, idx in zip(
            manifest.shards, manifest.shard_paths(), manifest.index_paths(), strict=True
        )
    ]
    checks = []
    with (
        TaskRunner(min(workers, len(tasks))) as runner,
        tqdm(total=manifest.count, unit="img", desc="verify", disable=None if progress else True) as bar,
    ):
        for check in runner.map_unordered(_verify_shard, tasks):
            checks.append(check)
            bar.update(len(check.indices))
    order = {entry.file: i for i, entry in enumerate(manifest.shards)}
    checks.sort(key=lambda c: order[c.file])
    problems = [p for check in checks for p in check.problems]
    problems += _check_set(manifest, checks)
    return VerifyReport(
        directory=manifest.root,
        count=manifest.count,
        shards=len(manifest.shards),
        samples_read=sum(len(c.indices) for c in checks),
        images_decoded=sum(c.decoded for c in checks),
        problems=problems,
        warnings=_stray_files(manifest),
    )


def _check_set(manifest: Manifest, checks: list[_ShardCheck]) -> list[Problem]:
    problems = []
    start = 0
    for entry in manifest.shards:
        if entry.index_range != (start, start + entry.count):
            problems.append(
                Problem(
                    f"index_range {list(entry.index_range)} should be {[start, start + entry.count]}",
                    entry.file,
                )
            )
        start += entry.count
    if start != manifest.count:
        problems.append(Problem(f"the manifest's count is {manifest.count} but its shards hold {start}"))
    seen = bytearray(manifest.count)
    outside, twice = [], []
    for check in checks:
        for index in check.indices:
            if not 0 <= index < manifest.count:
                outside.append(index)
            elif seen[index]:
                twice.append(index)
            else:
                seen[index] = 1
    missing = [i for i, flag in enumerate(seen) if not flag]
    for what, values in (("outside 0..N-1", outside), ("read twice", twice), ("missing", missing)):
        if values:
            shown = ", ".join(map(str, values[:10])) + (", …" if len(values) > 10 else "")
            problems.append(Problem(f"{len(values)} sample indices {what}: {shown}"))
    if manifest.class_counts:
        labels = sum((c.labels for c in checks), Counter[int]())
        read = [labels.get(i, 0) for i in range(len(manifest.classes))]
        if read != manifest.class_counts:
            problems.append(
                Problem(f"per-class counts read {read} differ from the manifest's {manifest.class_counts}")
            )
    return problems


def _stray_files(manifest: Manifest) -> list[str]:
    assert manifest.root is not None
    listed = {name for s in manifest.shards for name in (s.file, s.index_file)}
    stray = sorted(
        p.name
        for p in manifest.root.iterdir()
        if p.is_file() and p.suffix in (".tar", ".idx", ".tmp", ".jsonl") and p.name not in listed
    )
    return [f"{name} is not part of the manifest" for name in stray]


def _verify_shard(task: _ShardTask) -> _ShardCheck:
    entry = task.entry
    check = _ShardCheck(entry.file)

    def problem(message: str, sample: str | None = None) -> None:
        check.problems.append(Problem(message, entry.file, sample))

    tar_path = Path(task.tar_path)
    try:
        handle = open(tar_path, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        problem(f"cannot open: {error.strerror or error}")
        return check
    with handle:
        size, sha256 = _size_and_sha256(handle)
        if size != entry.bytes:
            problem(f"has {size} bytes, the manifest says {entry.bytes}")
        if sha256 != entry.sha256:
            problem("sha256 differs from the manifest")
        try:
            members = read_tar_members(handle)
        except ValueError as error:
            problem(f"unreadable tar: {error}")
            return check
        groups = _group_members(members, problem)
        _compare_dali_index(Path(task.index_path), groups, problem)
        if len(groups) != entry.count:
            problem(f"holds {len(groups)} samples, the manifest says {entry.count}")
        for position, (key, group) in enumerate(groups):
            _verify_sample(handle, task, position, key, group, check, problem)
    return check


def _size_and_sha256(handle: Any) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while block := handle.read(1 << 20):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def _group_members(members: list[TarMember], problem: Any) -> list[tuple[str, list[TarMember]]]:
    """Consecutive members sharing a key (the name up to its first dot), as webdataset and DALI group."""
    groups: list[tuple[str, list[TarMember]]] = []
    seen: set[str] = set()
    for member in members:
        if member.type not in REGULAR_FILE_TYPES:
            problem(f"member {member.name!r} is not a regular file")
            continue
        key = member.name.partition(".")[0]
        if groups and groups[-1][0] == key:
            groups[-1][1].append(member)
            continue
        if key in seen:
            problem("key appears in two separate runs of members", key)
        seen.add(key)
        groups.append((key, [member]))
    return groups


def _compare_dali_index(path: Path, groups: list[tuple[str, list[TarMember]]], problem: Any) -> None:
    try:
        indexed = read_dali_index(path)
    except (OSError, ValueError) as error:
        problem(f"DALI index {path.name} is unusable: {error}")
        return
    expected = [
        [IndexComponent(m.name.partition(".")[2], m.offset, m.size, m.name) for m in members]
        for _, members in groups
    ]
    if len(indexed) != len(expected):
        problem(f"DALI index {path.name} lists {len(indexed)} samples, the tar holds {len(expected)}")
    for (key, _), want, got in zip(groups, expected, indexed, strict=False):
        if want != got:
            problem(f"DALI index {path.name} does not match the tar (first difference here)", key)
            return


def _verify_sample(
    handle: Any,
    task: _ShardTask,
    position: int,
    key: str,
    members: list[TarMember],
    check: _ShardCheck,
    problem: Any,
) -> None:
    by_ext: dict[str, TarMember] = {}
    for member in members:
        ext = member.name.partition(".")[2]
        if ext in by_ext:
            problem(f"component {ext} appears twice", key)
        by_ext[ext] = member
    # the names this set's format version gives the components (``label``/``index`` in version 1)
    names = {stored_ext(ext, task.format_version): ext for ext in COMPONENT_ORDER}
    missing = [stored for stored in names if stored not in by_ext]
    extra = sorted(set(by_ext) - set(names))
    by_ext = {names.get(ext, ext): member for ext, member in by_ext.items()}
    if missing or extra:
        problem(f"components missing {missing} / unexpected {extra}", key)
        if missing:
            return

    def payload(ext: str) -> bytes:
        member = by_ext[ext]
        handle.seek(member.offset)
        return handle.read(member.size)

    try:
        label = decode_int(payload(LABEL_EXT))
        index = decode_int(payload(INDEX_EXT))
    except ValueError as error:
        problem(str(error), key)
        return
    check.indices.append(index)
    check.labels[label] += 1
    if key != sample_key(_shard_number(task.entry.file), position):
        problem(f"key at position {position} is not the generated one", key)
    cls = payload(CLASS_EXT)
    if cls != str(label).encode("ascii"):
        problem(f"cls {cls[:20]!r} does not match label {label}", key)
    if not (label == UNLABELLED or 0 <= label < task.num_classes):
        problem(f"label {label} is outside the {task.num_classes} classes", key)
    if index != task.entry.index_range[0] + position:
        problem(f"index {index} at position {position}; expected {task.entry.index_range[0] + position}", key)
    if task.decode:
        try:
            decode_rgb(payload(IMAGE_EXT))
            check.decoded += 1
        except BadInput as error:
            problem(f"image {error}", key)


def _shard_number(file: str) -> int:
    try:
        return int(Path(file).stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def describe(location: str | Path) -> dict[str, Any]:
    """What ``shards info`` prints: counts, classes (with per-class counts from the manifest), sizes."""
    manifest = load_manifest(location)
    sizes = [s.bytes for s in manifest.shards]
    counts = [s.count for s in manifest.shards]
    params = manifest.params
    per_class = (
        dict(zip(manifest.classes, manifest.class_counts, strict=True)) if manifest.class_counts else None
    )
    return {
        "directory": str(manifest.root),
        "count": manifest.count,
        "unlabelled": (
            manifest.count - sum(manifest.class_counts)
            if manifest.class_counts or not manifest.classes
            else None  # labelled, but per-class counts were not recorded
        ),
        "classes": manifest.classes,
        "class_counts": per_class,
        "shards": len(manifest.shards),
        "bytes": sum(sizes),
        "shard_bytes": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
        "shard_samples": {"min": min(counts, default=0), "max": max(counts, default=0)},
        "skipped": len(manifest.skipped),
        "notes": manifest.notes,
        "large_images": asdict(manifest.large_images) if manifest.large_images is not None else None,
        "source": params.get("source", {}),
        "seed": params.get("seed"),
        "subset": params.get("subset"),
        "content_hash": manifest.content_hash(),
    }
