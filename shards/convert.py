"""Converting a source into shard sets: plan, write shards in parallel, close index holes, write manifest.

    listing ─► (hold-out split) ─► seeded shuffle ─► plan shards ─► pool: write_shard per shard ─► journal
            ─► renumber the shards after the first skipped input ─► manifest.json ─► journal removed

Guarantees: a shard is under its final name only when complete; ``kill -9`` followed by the same command
finishes the job with every input exactly once; global indices are exactly 0..N-1 (in shard order, so each
shard's ``index_range`` is contiguous) whatever was skipped; the same command on a finished set is a no-op.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from clusterssl.errors import ShardsError
from clusterssl.shards.format import FORMAT_VERSION, MANIFEST_NAME, dali_index_path, shard_file_name
from clusterssl.shards.images import PrepareOptions
from clusterssl.shards.journal import Journal, journal_path, read_journal
from clusterssl.shards.jpeg import LARGE_SIDE
from clusterssl.shards.manifest import LargeImages, Manifest, ShardEntry, Skipped, load_manifest
from clusterssl.shards.parallel import TaskRunner
from clusterssl.shards.plan import ShardPlan, listing_hash, plan_shards, shuffled, stratified_holdout
from clusterssl.shards.sources import InputItem, Listing, Source
from clusterssl.shards.writer import (
    TMP_SUFFIX,
    RenumberTask,
    ShardResult,
    ShardTask,
    fsync_directory,
    renumber_shard,
    write_shard,
)

DEFAULT_SAMPLES_PER_SHARD = 1000
SUBSETS_WITH_HOLDOUT = ("train", "val")
LOCK_NAME = ".convert.lock"

SetStatus = Literal["written", "resumed", "unchanged"]


@dataclass(frozen=True)
class ConvertOptions:
    samples_per_shard: int | None = None
    """Inputs per shard; with neither limit given, ``DEFAULT_SAMPLES_PER_SHARD``."""
    bytes_per_shard: int | None = None
    seed: int = 0
    holdout: float | None = None
    """Fraction of every class written to ``OUT/val`` (the rest to ``OUT/train``); None: all to ``OUT``."""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    workers: int = 1
    overwrite: bool = False

    def shard_limits(self) -> tuple[int | None, int | None]:
        if self.samples_per_shard is None and self.bytes_per_shard is None:
            return DEFAULT_SAMPLES_PER_SHARD, None
        return self.samples_per_shard, self.bytes_per_shard


@dataclass
class SetOutcome:
    """One shard set the conversion produced (``name`` is ``""``, ``"train"`` or ``"val"``)."""

    name: str
    directory: Path
    manifest: Manifest
    status: SetStatus
    shards_written: int
    """Shards written by this run (the others were kept from an interrupted run)."""
    shards_renumbered: int
    inputs_processed: int = 0
    """Inputs read by this run (written or skipped), for its rate."""


@dataclass
class ConvertOutcome:
    sets: list[SetOutcome]
    inputs: int
    seconds: float

    @property
    def inputs_processed(self) -> int:
        return sum(s.inputs_processed for s in self.sets)

    @property
    def unchanged(self) -> bool:
        return all(s.status == "unchanged" for s in self.sets)


def convert(
    source: Source, out_dir: str | Path, options: ConvertOptions, progress: bool = False
) -> ConvertOutcome:
    """Convert ``source`` into shard set(s) under ``out_dir`` (see the module docstring)."""
    started = time.perf_counter()
    listing = source.list_inputs()
    out = Path(out_dir)
    walked = source.walked_directory()
    if walked is not None and out.resolve().is_relative_to(walked.resolve()):
        raise ShardsError(
            f"the output directory {out} lies inside the source directory {walked}; write it elsewhere"
        )
    _make_output_dir(out)
    with _exclusive(out):
        subsets = _split(listing.items, options)
        _clear_other_layout(out, holdout=options.holdout is not None, overwrite=options.overwrite)
        jobs = [
            _SetJob.open(
                name,
                out / name if name else out,
                shuffled(items, options.seed, name),
                listing,
                _params(source, listing, name, options),
                options,
            )
            for name, items in subsets
        ]
        _run(source, jobs, options, progress)
        outcomes = [job.finish() for job in jobs]
    return ConvertOutcome(outcomes, len(listing.items), time.perf_counter() - started)


def merge_outcomes(outcomes: list[ConvertOutcome]) -> ConvertOutcome:
    """One outcome for conversions run one after the other (the splits of an IDX directory)."""
    return ConvertOutcome(
        [s for o in outcomes for s in o.sets],
        sum(o.inputs for o in outcomes),
        sum(o.seconds for o in outcomes),
    )


def _split(items: list[InputItem], options: ConvertOptions) -> list[tuple[str, list[InputItem]]]:
    if options.holdout is None:
        return [("", items)]
    train, val = stratified_holdout(items, options.holdout, options.seed)
    if not train or not val:
        raise ShardsError(
            f"a hold-out of {options.holdout} leaves {len(train)} training and {len(val)} validation "
            f"inputs out of {len(items)}; choose a fraction that leaves both non-empty"
        )
    return [("train", train), ("val", val)]


def _params(source: Source, listing: Listing, subset: str, options: ConvertOptions) -> dict[str, Any]:
    """Everything that decides the bytes written (not ``workers``): equal params mean equal shards."""
    samples_per_shard, bytes_per_shard = options.shard_limits()
    return {
        "format_version": FORMAT_VERSION,
        "source": source.describe(),
        "inputs": len(listing.items),
        "input_hash": listing_hash(listing.items, listing.classes),
        "seed": options.seed,
        "samples_per_shard": samples_per_shard,
        "bytes_per_shard": bytes_per_shard,
        "holdout": options.holdout,
        "subset": subset or None,
        "check": options.prepare.check,
        "max_side": options.prepare.max_side,
        "max_pixels": options.prepare.max_pixels,
        "jpeg_quality": options.prepare.jpeg_quality,
    }


def _normalised(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params))


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in ("input_hash", "inputs"):
            changed.append("the inputs differ")
        else:
            changed.append(f"{key}: {old.get(key)!r} → {new.get(key)!r}")
    return "; ".join(dict.fromkeys(changed)) or "format"


def _make_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ShardsError(f"output path exists and is not a directory: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ShardsError(f"cannot create output directory {out}: {error.strerror or error}") from None


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``OUT/.convert.lock`` so two conversions never write into the same directory at once.

    The lock file stays when the conversion ends: removing it while locked would let a conversion that
    opened it meanwhile lock the removed file while the next one creates and locks a new one, two
    writers at once."""
    path = out / LOCK_NAME
    try:
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except OSError as error:
        raise ShardsError(f"output directory is not writable: {out} ({error.strerror or error})") from None
    try:
        if not _lock(handle, LOCK_GRACE_SECONDS):
            raise ShardsError(f"another conversion is writing into {out}")
        yield
    finally:
        handle.close()


LOCK_GRACE_SECONDS = 3.0
"""How long to wait for the lock: a conversion killed just before this one started releases it only
when its workers' last direct writes have finished (milliseconds), not at once."""


def _lock(handle: TextIO, grace: float) -> bool:
    """Take an exclusive advisory lock on ``handle``, waiting up to ``grace`` seconds; True without locks
    on this platform (nothing to guard with)."""
    try:
        import fcntl
    except ImportError:
        return True
    deadline = time.monotonic() + grace
    while True:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _shard_files(directory: Path) -> list[Path]:
    """Files a conversion writes into a set directory (shards, indexes, their temporaries, manifest)."""
    patterns = ("shard-*.tar", "shard-*.idx", f"shard-*{TMP_SUFFIX}", f"{MANIFEST_NAME}{TMP_SUFFIX}")
    return sorted({path for pattern in patterns for path in directory.glob(pattern)})


def _clear_set(directory: Path) -> None:
    for path in [*_shard_files(directory), directory / MANIFEST_NAME, journal_path(directory)]:
        path.unlink(missing_ok=True)


def _holds_set(directory: Path) -> bool:
    return (directory / MANIFEST_NAME).exists() or journal_path(directory).exists()


def _clear_other_layout(out: Path, holdout: bool, overwrite: bool) -> None:
    """Refuse to write train/val next to a plain set in the same OUT (or the reverse) unless overwriting."""
    others = [out] if holdout else [out / name for name in SUBSETS_WITH_HOLDOUT]
    for directory in others:
        if not _holds_set(directory):
            continue
        if not overwrite:
            layout = "a shard set without hold-out" if holdout else "train/ and val/ shard sets"
            raise ShardsError(f"{out} already holds {layout}; use --overwrite to replace it")
        _clear_set(directory)


@dataclass
class _SetJob:
    """The state of one shard set during a conversion."""

    name: str
    directory: Path
    items: list[InputItem]
    """Shuffled: position = planned global index."""
    plans: list[ShardPlan]
    classes: list[str]
    notes: list[str]
    params: dict[str, Any]
    status: SetStatus
    completed: dict[int, ShardResult]
    journal: Journal | None
    existing: Manifest | None = None
    written: int = 0
    processed: int = 0
    renumbered: int = 0

    @classmethod
    def open(
        cls,
        name: str,
        directory: Path,
        items: list[InputItem],
        listing: Listing,
        params: dict[str, Any],
        options: ConvertOptions,
    ) -> _SetJob:
        """Decide between no-op, resume and fresh start; refuse to mix with another conversion's files."""
        params = _normalised(params)
        plans = plan_shards(items, *options.shard_limits())
        job = cls(name, directory, items, plans, listing.classes, listing.notes, params, "written", {}, None)
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / MANIFEST_NAME).exists():
            existing = _load_existing(directory, options.overwrite)
            if existing is not None and existing.params == params:
                missing = _missing_files(existing)
                if not missing:
                    journal_path(directory).unlink(missing_ok=True)
                    job.status, job.existing = "unchanged", existing
                    return job
                if not options.overwrite:
                    raise ShardsError(
                        f"{directory} holds this conversion's manifest but {missing}; "
                        "use --overwrite to write it again"
                    )
            elif existing is not None and not options.overwrite:
                raise ShardsError(
                    f"{directory} already holds a shard set made with different parameters "
                    f"({_describe_difference(existing.params, params)}); use --overwrite to replace it"
                )
            _clear_set(directory)
        header, completed = read_journal(directory)
        if header is not None and _normalised(header) != params:
            if not options.overwrite:
                raise ShardsError(
                    f"{directory} holds an interrupted conversion with different parameters "
                    f"({_describe_difference(header, params)}); re-run it as it was, or use --overwrite"
                )
            _clear_set(directory)
            header, completed = None, {}
        if header is None and _shard_files(directory):
            if not options.overwrite:
                raise ShardsError(
                    f"{directory} holds shard files but no manifest or journal; use --overwrite to replace them"
                )
            _clear_set(directory)
        for path in directory.glob(f"*{TMP_SUFFIX}"):
            path.unlink()
        job.completed = {n: r for n, r in completed.items() if job._still_valid(r)}
        job.journal = Journal(directory, params, resume=header is not None)
        job.status = "resumed" if header is not None else "written"
        return job

    def _still_valid(self, result: ShardResult) -> bool:
        """A journalled shard is kept when the plan still has it and its files have the journalled size."""
        if result.number >= len(self.plans):
            return False
        plan = self.plans[result.number]
        tar = self.directory / result.file
        return (
            result.planned_range == (plan.start, plan.stop)
            and tar.is_file()
            and tar.stat().st_size == result.bytes
            and dali_index_path(tar).is_file()
        )

    def pending_plans(self) -> list[ShardPlan]:
        """The planned shards this run still has to write."""
        if self.status == "unchanged":
            return []
        return [plan for plan in self.plans if plan.number not in self.completed]

    def write_task(self, plan: ShardPlan, source: Source, options: ConvertOptions) -> ShardTask:
        return ShardTask(
            source=source,
            set_name=self.name,
            directory=str(self.directory),
            number=plan.number,
            file=shard_file_name(plan.number),
            inputs=[(self.items[i].ref, self.items[i].label, i) for i in range(plan.start, plan.stop)],
            options=options.prepare,
        )

    def record(self, result: ShardResult) -> None:
        assert self.journal is not None
        self.journal.record(result)
        self.completed[result.number] = result
        self.written += 1
        self.processed += result.count + len(result.skipped)

    def renumber_tasks(self) -> list[RenumberTask]:
        """The shards whose samples' planned indices differ from their final ones: those at or after
        the first skipped input. Recomputed from the journal alone, so running them twice is harmless."""
        if self.status == "unchanged":
            return []
        tasks = []
        final_start = 0
        for result in self._results():
            if result.count and (result.planned_range[0] != final_start or result.skipped):
                tasks.append(
                    RenumberTask(self.name, result.number, str(self.directory / result.file), final_start)
                )
            final_start += result.count
        return tasks

    def renumbered_to(self, number: int, sha256: str) -> None:
        self.completed[number].sha256 = sha256
        self.renumbered += 1

    def _results(self) -> list[ShardResult]:
        missing = [plan.number for plan in self.plans if plan.number not in self.completed]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {self.directory} were never written")
        return [self.completed[plan.number] for plan in self.plans]

    def finish(self) -> SetOutcome:
        """Write ``manifest.json`` (atomically, last) and remove the journal."""
        if self.status == "unchanged":
            assert self.existing is not None
            return SetOutcome(self.name, self.directory, self.existing, "unchanged", 0, 0)
        entries, skipped, labels, large_sides = [], [], Counter[int](), []
        start = 0
        for result in self._results():
            skipped.extend(Skipped(ref, reason) for ref, reason in result.skipped)
            labels.update(result.label_counts)
            large_sides.extend(result.large_sides)
            if result.count == 0:  # every input of this shard was bad: no empty tar in the set
                for path in (self.directory / result.file, self.directory / result.index_file):
                    path.unlink(missing_ok=True)
                continue
            entries.append(
                ShardEntry(
                    file=result.file,
                    index_file=result.index_file,
                    count=result.count,
                    bytes=result.bytes,
                    sha256=result.sha256,
                    index_range=(start, start + result.count),
                )
            )
            start += result.count
        if start == 0:
            first = skipped[0]
            raise ShardsError(
                f"every input of {self.directory} was skipped (e.g. {first.input}: {first.reason})"
            )
        manifest = Manifest(
            count=start,
            classes=list(self.classes),
            shards=entries,
            skipped=skipped,
            params=self.params,
            class_counts=[labels.get(i, 0) for i in range(len(self.classes))],
            notes=list(self.notes),
            large_images=LargeImages(LARGE_SIDE, len(large_sides), max(large_sides, default=0)),
            root=self.directory.resolve(),
        )
        fsync_directory(self.directory)  # every shard's rename is durable before the manifest exists
        manifest.save(self.directory)
        fsync_directory(self.directory)
        assert self.journal is not None
        self.journal.remove()
        return SetOutcome(
            self.name, self.directory, manifest, self.status, self.written, self.renumbered, self.processed
        )


def _load_existing(directory: Path, overwrite: bool) -> Manifest | None:
    try:
        return load_manifest(directory)
    except ShardsError:
        if overwrite:
            return None
        raise


def _missing_files(manifest: Manifest) -> str:
    """'' when every shard and index is present with the manifest's size, else what is wrong first."""
    for shard, tar, idx in zip(manifest.shards, manifest.shard_paths(), manifest.index_paths(), strict=True):
        if not tar.is_file() or not idx.is_file():
            return f"{shard.file} or its index is missing"
        if tar.stat().st_size != shard.bytes:
            return f"{shard.file} has {tar.stat().st_size} bytes instead of {shard.bytes}"
    return ""


def _run(source: Source, jobs: list[_SetJob], options: ConvertOptions, progress: bool) -> None:
    """Write every missing shard of every set in one pool, then renumber where inputs were skipped."""
    from tqdm import tqdm

    by_name = {job.name: job for job in jobs}
    pending = [(job, plan) for job in jobs for plan in job.pending_plans()]
    # built one by one as workers free up: the task list of a large set would hold every input again
    tasks = (job.write_task(plan, source, options) for job, plan in pending)
    total_shards = sum(len(job.plans) for job in jobs if job.status != "unchanged")
    with TaskRunner(min(options.workers, max(total_shards, 1))) as runner:
        results = runner.map_unordered(write_shard, tasks, len(pending))  # workers start before the bar
        bar = tqdm(
            total=sum(plan.stop - plan.start for _, plan in pending),
            unit="img",
            desc="convert",
            disable=None if progress else True,
        )
        with bar:
            for result in results:
                by_name[result.set_name].record(result)
                bar.update(result.count + len(result.skipped))
        renumber = [task for job in jobs for task in job.renumber_tasks()]
        for set_name, number, sha256 in runner.map_unordered(renumber_shard, renumber):
            by_name[set_name].renumbered_to(number, sha256)
