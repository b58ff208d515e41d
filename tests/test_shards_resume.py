"""Interrupted conversions: kill -9 half-way, re-run, and every input is there exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ImageFolder
from test_shards_convert import corrupt_inputs

from clusterssl.errors import ShardsError
from clusterssl.shards.convert import ConvertOptions, convert
from clusterssl.shards.journal import JOURNAL_NAME
from clusterssl.shards.manifest import Manifest, load_manifest
from clusterssl.shards.reader import iter_samples
from clusterssl.shards.sources import ImageFolderSource
from clusterssl.shards.verify import verify
from clusterssl.tools.cli import cli

REPO = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.update(int(c) for c in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """Whether any thread of the process still runs: a killed worker's leader turns zombie at once, while
    its writer thread may still finish a direct write, holding the worker's files (and the lock)."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def crash_before_manifest(self: Manifest, directory: object) -> None:
    raise KeyboardInterrupt("simulated crash just before manifest.json is written")


def convert_until_the_manifest(source: ImageFolderSource, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert with 3 samples per shard and crash just before manifest.json: every shard and the journal
    are written, the manifest is not."""
    with monkeypatch.context() as patch:
        patch.setattr(Manifest, "save", crash_before_manifest)
        with pytest.raises(KeyboardInterrupt):
            convert(source, out, ConvertOptions(samples_per_shard=3))


def journalled_shards(out: Path) -> int:
    try:
        lines = (out / JOURNAL_NAME).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"kind": "shard"' in line for line in lines)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and kill -9")
def test_kill_9_then_rerun_finishes_with_every_input_exactly_once(
    image_folder: ImageFolder, tmp_path: Path
) -> None:
    bad = corrupt_inputs(image_folder)  # 15 good + 3 bad inputs: the resumed run must also close the holes
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(Path(__file__).with_name("shards_helpers.py")),
        str(image_folder.root),
        str(out),
        "2",
        "2",
        "0.1",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: journalled_shards(out) >= 1 or process.poll() is not None, 60, "the first shard")
        assert process.poll() is None, process.communicate()[0].decode()
        workers = children_of(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    # the workers die with the converter (PR_SET_PDEATHSIG), so nothing keeps writing behind our back
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "orphaned workers to exit")
    done_before = journalled_shards(out)
    assert 1 <= done_before < 9, "the kill must land half-way for this test to mean anything"
    assert not (out / "manifest.json").exists()

    result = CliRunner().invoke(
        cli,
        ["shards", "convert", "imagefolder", str(image_folder.root), str(out), "--samples-per-shard", "2",
         "--workers", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    (written,) = summary["sets"]
    assert written["status"] == "resumed"
    assert written["shards_written"] <= 9 - done_before
    assert summary["inputs_processed"] == 2 * written["shards_written"], "kept shards are not read again"

    manifest = load_manifest(out)
    samples = list(iter_samples(out))
    assert sorted(s.src for s in samples) == sorted(image_folder.inputs), "no input lost, none twice"
    assert [s.index for s in samples] == list(range(15))
    assert sorted(s.input for s in manifest.skipped) == sorted(bad)
    assert manifest.count == 15
    assert not list(out.glob("*.tmp")) and not (out / JOURNAL_NAME).exists()
    assert verify(out).ok

    # the resumed set is byte-identical to an uninterrupted conversion
    convert(ImageFolderSource(image_folder.root), tmp_path / "clean", ConvertOptions(samples_per_shard=2))
    assert load_manifest(tmp_path / "clean").content_hash() == manifest.content_hash()


def test_crash_after_renumbering_before_manifest_resumes_idempotently(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt_inputs(image_folder)
    source = ImageFolderSource(image_folder.root)
    out = tmp_path / "out"

    convert_until_the_manifest(source, out, monkeypatch)
    assert (out / JOURNAL_NAME).exists() and not (out / "manifest.json").exists()
    with open(out / JOURNAL_NAME, "a") as journal:  # and the crash tore a line in half
        journal.write('{"kind": "shard", "set": "", "sha')

    outcome = convert(source, out, ConvertOptions(samples_per_shard=3))
    assert outcome.sets[0].status == "resumed" and outcome.sets[0].shards_written == 0
    assert outcome.sets[0].shards_renumbered > 0, "the renumbering ran again over already patched shards"
    assert [s.index for s in iter_samples(out)] == list(range(15))
    assert verify(out).ok
    convert(source, tmp_path / "clean", ConvertOptions(samples_per_shard=3))
    assert load_manifest(tmp_path / "clean").content_hash() == load_manifest(out).content_hash()


def test_journal_of_other_parameters_is_refused(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = ImageFolderSource(image_folder.root)
    out = tmp_path / "out"
    convert_until_the_manifest(source, out, monkeypatch)
    with pytest.raises(ShardsError, match="interrupted conversion with different parameters"):
        convert(source, out, ConvertOptions(samples_per_shard=4))
    outcome = convert(source, out, ConvertOptions(samples_per_shard=4, overwrite=True))
    assert outcome.sets[0].status == "written"
    assert [s.count for s in load_manifest(out).shards] == [4, 4, 4, 3]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(4)]
    assert os.listdir(out).count(JOURNAL_NAME) == 0
