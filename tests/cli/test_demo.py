"""`seechat demo` from an installed wheel, in a folder that is not the repository.

The demo's recipes and experts must travel inside the package (package data): a non-editable
install run anywhere else has no `configs/` or `seechat/mini/weights` beside it. The test builds
the wheel, checks what it carries, installs it into a fresh venv (offline: the venv reaches the
dependencies already installed beside this interpreter through a `.pth` line, never an index) and
runs a shrunken demo from an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # only the venv
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools builds in the source tree, and a stale build/ there would
    # put modules that no longer exist into the wheel.
    src = out / "src"
    junk = (
        ".git",
        ".venv",
        "build",
        "*.egg-info",
        "runs",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "tmp",
    )
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*junk))
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(out), str(src)],
        cwd=out,
    )
    (path,) = out.glob("seechat-*.whl")
    return path


def test_the_wheel_carries_recipes_experts_and_the_chat_page(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "seechat/mini/recipes/stage1.yaml",
        "seechat/mini/recipes/stage2.yaml",
        "seechat/mini/weights/clip/model.safetensors",
        "seechat/mini/weights/lm/model.safetensors",
        "seechat/mini/weights/lm/tokenizer/tokenizer.json",
        "seechat/serve/static/index.html",
        "seechat/cli/__main__.py",
    ):
        assert needed in names, f"{needed} is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "configs/", "benchmarks/"))]


def test_demo_runs_from_an_installed_wheel_in_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
        ).stdout.strip()
    )
    # The dependencies: this interpreter's site-packages, appended after the venv's own (a plain
    # path line: its .pth files, among them the editable install of the repository, are not run).
    here = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (purelib / "deps.pth").write_text("\n".join(dict.fromkeys(here)) + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        tmp_path,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([str(python), "-c", "import seechat; print(seechat.__file__)"], elsewhere).stdout
    assert Path(where.strip()).is_relative_to(venv), where  # the wheel, not the repository
    small = ["data.num_workers=0", "train.batch_size=4", "train.max_steps=2", "train.log_every=1"]
    done = run(
        [str(venv / "bin" / "seechat"), "demo", "--out", "run", "--scenes", "24", "4", "6"]
        + ["--stage1", *small, "--stage2", *small, "--eval-limit", "6"],
        cwd=elsewhere,
    )
    assert "[world] building the mini world" in done.stdout and "VQA accuracy" in done.stdout
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["vqa_questions"] == 6 and (elsewhere / "run" / "stage2" / "config.json").is_file()
