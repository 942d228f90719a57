"""Architecture rules (pyproject.toml ``[tool.importlinter]``) and the one import namespace.

import-linter reads a package from one directory tree, while ours is mapped from several top-level
folders (``[tool.setuptools.package-dir]``). The test lays the sources out as an installed wheel
would, following that mapping, and runs ``lint-imports`` on the result.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(target: Path) -> Path:
    """Copy every mapped package's .py files to ``target/<dotted path>``, as a wheel installs them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        source = ROOT / setuptools["package-dir"][package]
        destination = target.joinpath(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for path in source.glob("*.py"):
            shutil.copy2(path, destination / path.name)
    return target


def test_import_contracts_hold(tmp_path):
    site = installed_layout(tmp_path / "site")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), str(tmp_path / "pyproject.toml")], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_package_folder_is_mapped():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == set(setuptools["package-dir"])
    assert all(p == "lift_serve" or p.startswith("lift_serve.") for p in setuptools["packages"])
    for folder in setuptools["package-dir"].values():
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_users_own_model_and_service_shadow_nothing(tmp_path):
    """A user's ``model.py`` and ``service/`` in the working directory (first on sys.path) leave our
    imports alone: everything lives under ``lift_serve``."""
    (tmp_path / "model.py").write_text("raise ImportError('the user model.py was imported')\n")
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("raise ImportError('the user service/ was imported')\n")
    (tmp_path / "training.py").write_text("raise ImportError('the user training.py was imported')\n")
    probe = ("import lift_serve.model.export_cli, lift_serve.service.app, lift_serve.training.trainer\n"
             "from lift_serve.client import LiftClient\n"
             "from lift_serve.cli import build_parser\n"
             "build_parser()\n"
             "print('ours imported')\n"
             "import model, service\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # Our imports succeed; only the user's own `import model, service` at the end reaches their files.
    assert done.stdout.strip() == "ours imported", done.stderr[-2000:]
    assert "the user model.py was imported" in done.stderr
