"""The distribution as a user installs it: one import root, bundled configs, no bare top-level packages.

The wheel is built from this checkout and installed (without dependencies) into a fresh virtual
environment that borrows the test environment's installed libraries through a path file, so nothing is
downloaded. Commands then run from a directory outside the repository that holds a ``models/`` package of
its own, as most ML repositories do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC_NAMES = ("models", "tools", "pipeline", "shards", "configs", "tests")


# What a build from a copy of the checkout leaves out: environments, build and run outputs at the top (a
# top-level data/ is the demo's; pipeline/data/ is code), caches and compiled modules anywhere.
TOP_LEVEL_OUTPUTS = {".git", ".venv", ".pyroot", "build", "dist", "data", "runs", "mlruns", "mlflow.db"}
ANYWHERE = shutil.ignore_patterns("*.so", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")


def not_source(directory: str, names: list[str]) -> set[str]:
    skipped = set(ANYWHERE(directory, names))
    if Path(directory).resolve() == REPO:
        skipped |= TOP_LEVEL_OUTPUTS.intersection(names)
    return skipped


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools writes its build/ folder next to the sources it builds.
    source = tmp_path_factory.mktemp("source") / "clusterssl"
    shutil.copytree(REPO, source, ignore=not_source)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([*build, str(source)], check=True, cwd=out, env={**os.environ, "PIP_NO_INPUT": "1"})
    (found,) = out.glob("clusterssl-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The libraries (torch, mlflow, …) of the environment running the tests, but not its editable
    # clusterssl: a path listed in a .pth file is added as it is, without running the .pth files inside it.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return venv


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    """A user's own repository with a ``models`` package that must keep importing."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text('WHO = "the user\'s models"\n', encoding="utf-8")
    return tmp_path


def test_wheel_holds_one_import_root_with_configs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    roots = {name.split("/", 1)[0] for name in names if "/" in name and ".dist-info" not in name}
    assert roots == {"clusterssl"}
    assert "clusterssl/configs/swav_digits.yaml" in names
    assert "clusterssl/pipeline/data/loader.py" in names and "clusterssl/__main__.py" in names
    assert not [name for name in names if name.startswith("clusterssl/tests/")]


def test_installed_package_trains_beside_a_users_models_folder(fresh_venv: Path, user_project: Path) -> None:
    python = fresh_venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert not [name for name in GENERIC_NAMES if (Path(site) / name).exists()]

    env = {**os.environ, "CLUSTERSSL_CACHE": str(user_project / "cache"), "PYTHONPATH": ""}
    env.pop("CLUSTERSSL_CONFIG_DIR", None)
    which = subprocess.run(
        [python, "-c", "import models, clusterssl; print(models.WHO); print(clusterssl.__file__)"],
        cwd=user_project,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert which[0] == "the user's models"
    assert which[1].startswith(site)

    result = subprocess.run(
        [fresh_venv / "bin" / "clusterssl", "train", "swav_digits", "--set", "trainer.epochs=1",
         "--set", f"trainer.output_dir={user_project / 'run'}", "--no-track", "--json"],
        cwd=user_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] > 0 and summary["epochs_done"] == 1
    assert (user_project / "run" / "backbone.pt").is_file()

    module = subprocess.run(
        [python, "-m", "clusterssl", "--help"], cwd=user_project, env=env, capture_output=True, text=True
    )
    assert module.returncode == 0 and "Stages:" in module.stdout
