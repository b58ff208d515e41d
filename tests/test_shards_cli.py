"""The shards CLI: one-line errors with exit code 2, and --json summaries that parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ImageFolder

from clusterssl.tools.cli import cli
from clusterssl.tools.shards_cmd import ByteSize


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("make_args", "fragment"),
    [
        (lambda t: ["imagefolder", str(t / "nope"), str(t / "out")], "source directory does not exist"),
        (lambda t: ["list", str(t / "nope.csv"), str(t / "out")], "list file does not exist"),
        (lambda t: ["tfrecord", str(t), str(t / "out")], "unknown source kind 'tfrecord'; known: digits"),
    ],
)
def test_missing_or_unknown_source_is_one_line_exit_2(tmp_path: Path, make_args, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(invoke("shards", "convert", *make_args(tmp_path)), fragment)


def test_empty_source_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "notes.txt").write_text("not an image")
    result = invoke("shards", "convert", "imagefolder", str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(result, "no images found in")
    (tmp_path / "empty.csv").write_text("path,label\n")
    result = invoke("shards", "convert", "list", str(tmp_path / "empty.csv"), str(tmp_path / "out"))
    assert_one_line_error(result, "list file has no entries")
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,1\n")
    result = invoke("shards", "convert", "list", str(tmp_path / "bad.csv"), str(tmp_path / "out"))
    assert_one_line_error(result, "needs a header line with a 'path' column")


def test_unwritable_output_is_one_line_exit_2(image_folder: ImageFolder, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = invoke("shards", "convert", "imagefolder", str(image_folder.root), str(blocker / "out"))
    assert_one_line_error(result, "cannot create output directory")
    result = invoke("shards", "convert", "imagefolder", str(image_folder.root), str(blocker))
    assert_one_line_error(result, "output path exists and is not a directory")


def test_a_full_disk_while_writing_is_one_line_exit_2(
    image_folder: ImageFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from clusterssl.shards import sink

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # where the sinks hand bytes to the kernel: the direct sink's writer thread, the buffered writev (the
    # sinks' own write/space/commit stay real, so both per-sample loops reach the failure their own way)
    monkeypatch.setattr(sink.DirectSink, "_write_chunk", disk_full)
    monkeypatch.setattr(sink, "_write_all", disk_full)
    out = tmp_path / "out"
    result = invoke("shards", "convert", "imagefolder", str(image_folder.root), str(out), "--workers", "1")
    assert_one_line_error(result, "No space left on device")
    assert "run the same command again" in result.stderr
    assert not list(out.glob("shard-*")), "no shard under its final name, no partial file left behind"


def test_output_inside_the_source_is_refused(image_folder: ImageFolder) -> None:
    result = invoke(
        "shards", "convert", "imagefolder", str(image_folder.root), str(image_folder.root / "out")
    )
    assert_one_line_error(result, "lies inside the source directory")
    assert not (image_folder.root / "out").exists()


def test_verify_and_info_without_a_shard_set_are_exit_2(tmp_path: Path) -> None:
    assert_one_line_error(invoke("shards", "verify", str(tmp_path / "nope")), "no such file or directory")
    assert_one_line_error(invoke("shards", "info", str(tmp_path)), "no shard set at")


def test_changed_parameters_are_refused_in_one_line(image_folder: ImageFolder, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert invoke("shards", "convert", "imagefolder", str(image_folder.root), out).exit_code == 0
    result = invoke("shards", "convert", "imagefolder", str(image_folder.root), out, "--seed", "1")
    assert_one_line_error(result, "different parameters (seed: 0 → 1); use --overwrite")


def test_json_summaries_parse(image_folder: ImageFolder, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "shards", "convert", "imagefolder", str(image_folder.root), str(out), "--holdout", "0.4",
        "--samples-per-shard", "3", "--workers", "1", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["inputs"] == 15 and summary["unchanged"] is False
    assert [(s["name"], s["count"], s["status"]) for s in summary["sets"]] == [
        ("train", 9, "written"),
        ("val", 6, "written"),
    ]
    again = json.loads(
        invoke(
            "shards", "convert", "imagefolder", str(image_folder.root), str(out), "--holdout", "0.4",
            "--samples-per-shard", "3", "--json",
        ).stdout
    )  # fmt: skip
    assert again["unchanged"] is True and {s["status"] for s in again["sets"]} == {"unchanged"}

    info = json.loads(invoke("shards", "info", str(out), "--json").stdout)
    assert [s["count"] for s in info["sets"]] == [9, 6]
    assert info["sets"][1]["class_counts"] == {"bird": 2, "cat": 2, "dog": 2}
    assert info["sets"][0]["shards"] == 3 and info["sets"][0]["subset"] == "train"

    verified = json.loads(invoke("shards", "verify", str(out), "--json").stdout)
    assert verified["ok"] is True and [s["images_decoded"] for s in verified["sets"]] == [9, 6]


def test_human_outputs_mention_the_numbers(image_folder: ImageFolder, tmp_path: Path) -> None:
    (image_folder.root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = str(tmp_path / "out")
    result = invoke(
        "shards", "convert", "imagefolder", str(image_folder.root), out, "--samples-per-shard", "5"
    )
    assert result.exit_code == 0
    assert "15 samples in 4 shard(s)" in result.stdout and "1 input(s) skipped" in result.stdout
    assert (
        "skipped cat/broken.jpg: not an image: UnidentifiedImageError: cannot identify image file\n"
        in result.stdout
    )
    info = invoke("shards", "info", out).stdout
    assert "samples   15" in info and "classes   3: bird: 5, cat: 5, dog: 5" in info
    assert "OK " in invoke("shards", "verify", out).stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500000", 500_000), ("256MB", 256_000_000), ("1.5GiB", 3 * 2**29), ("64 kib", 65536)],
)
def test_byte_sizes_parse(text: str, expected: int) -> None:
    assert ByteSize().convert(text, None, None) == expected


def test_bad_byte_size_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("shards", "convert", "digits", str(tmp_path), "--bytes-per-shard", "12 parsecs")
    assert result.exit_code == 2 and "is not a size like" in result.output
