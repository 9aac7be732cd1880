"""`pip install .`: a wheel with the packages, the configs and one console script per stage, and the documented
way to read features back, working outside the repository and without pandas."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iv2trt.output.writer import FeatureWriter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel (offline, from a copy of its sources) and installed into a folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src)
    for package in ("iv2trt", "configs"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "wheel"),
                    str(src)], check=True, capture_output=True)
    wheel = next((tmp / "wheel").glob("iv2trt-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True)
    return tmp / "site"


def _run(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "1000"}  # --help on one line a setting
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, says", [("iv2trt-export", "Stage 1"), ("iv2trt-build", "Stage 2"),
                                          ("iv2trt-infer", "Stage 3")])
def test_console_scripts_run_the_stages(installed, tmp_path, script, says):
    result = _run(installed, [str(installed / "bin" / script), "--help"], tmp_path)
    assert result.returncode == 0 and says in result.stdout, result.stderr
    assert str(installed / "iv2trt" / "configs" / "internvideo2_clip_s14.yaml") in result.stdout  # its --config


def test_installed_package_loads_features_without_pandas(installed, tmp_path):
    out = tmp_path / "features"
    writer = FeatureWriter(out, "float32", shard_size=2)
    expected = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    clips = [{"start_s": 0.0, "end_s": 2.0, "indices": [0, 1]}, {"start_s": 2.0, "end_s": 4.0, "indices": [50, 51]}]
    writer.add_video("/in/a.mp4", "a.mp4", "video", clips, expected[:2])
    writer.add_video("/in/b.mp4", "b.mp4", "video", clips[:1], expected[2:])
    writer.flush()
    script = f"""
import json, sys

class NoPandas:  # importing pandas fails from here on, as where it is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pandas":
            raise ModuleNotFoundError("No module named 'pandas'", name=name)

sys.meta_path.insert(0, NoPandas())
import iv2trt
from iv2trt import load_features
from iv2trt.model import resolve_variant
from iv2trt.models import list_variants, load_vision_config
assert "internvideo2_clip_s14" in list_variants() and load_vision_config("s14").embed_dim == 384
features, rows = load_features({str(out)!r})
assert "pandas" not in sys.modules
print(json.dumps({{"module": iv2trt.__file__, "variant": resolve_variant("s14"), "features": features.tolist(),
                  "rows": [[r["row"], r["video"], r["clip"], r["window_start_s"], r["window_end_s"]] for r in rows]}}))
"""
    result = _run(installed, [sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["module"].startswith(str(installed)) and got["variant"].startswith(str(installed))
    np.testing.assert_array_equal(np.array(got["features"], np.float32), expected)
    assert got["rows"] == [[0, "/in/a.mp4", 0, 0.0, 2.0], [1, "/in/a.mp4", 1, 2.0, 4.0], [2, "/in/b.mp4", 0, 0.0, 2.0]]


def test_the_wheel_installs_every_subpackage_and_no_top_level_models(installed):
    """pyproject.toml lists the packages by hand: a new subpackage missing there would be missing installed."""
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "iv2trt").rglob("__init__.py")}
    inits = (installed / "iv2trt").rglob("__init__.py")
    installed_packages = {p.parent.relative_to(installed).as_posix() for p in inits}
    assert packages <= installed_packages, packages - installed_packages
    assert not (installed / "models").exists()  # the model code installs as iv2trt.models, never as `models`


def test_building_leaves_the_project_s_build_folder_to_the_pipeline(installed):
    """build/ holds the ONNX files, engines and timing cache by default; before, setuptools wrote its build/lib
    and build/bdist.* there too (pip install . builds in the source tree)."""
    src = installed.parent / "src"
    assert (src / "iv2trt.egg-info").exists()  # the build ran in this tree
    assert not (src / "build").exists()
