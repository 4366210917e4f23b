"""A non-editable install carries everything the audit reads at run time (templates, suites, lexicon, bundled
models with their relevance matrices and audit profiles), not only a checkout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_package_finds_its_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    probe = (
        "import auditor, auditor.resources as r, auditor.cli, auditor.concepts\n"
        "from auditor.zoo import bundled_models\n"
        "assert r.templates_dir().joinpath('report.html.j2').is_file()\n"
        "assert r.suites_dir().joinpath('shapes-default.yaml').is_file()\n"
        "for m in bundled_models(): assert (m.path / 'profile.json').is_file(), m\n"
        "ms = bundled_models(); assert ms\n"
        "for m in ms: assert any((m.path / d / 'diffusion_pytorch_model.safetensors').is_file() "
        "for d in ('unet', 'transformer')), m\n"
        "print(auditor.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    for name in ("zoo/models/shapes-v1/profile.json", "zoo/models/shapes-v1/relevance.npz", "lexicon"):
        assert (target / "auditor" / name).exists() == (ROOT / "auditor" / name).exists(), name
    # every subpackage of the source ships (pyproject lists them by name)
    for init in (ROOT / "auditor").rglob("__init__.py"):
        assert (target / init.relative_to(ROOT)).is_file(), init.relative_to(ROOT)


@pytest.mark.parametrize("dist", ["diffusers", "transformers"])
def test_model_library_ranges_are_the_tested_versions(dist):
    """pyproject allows only the minor series the suite ran with, starting at the installed release: a wider range
    would promise versions nobody loaded the bundled models with (tests/test_bundled.py checks the loading)."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == dist)
    installed = Version(version(dist))
    assert installed in req.specifier, f"{dist} {installed} is installed but pyproject allows {req.specifier}"
    lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
    upper = [Version(s.version) for s in req.specifier if s.operator == "<"]
    assert lower and upper, f"{dist}: expected a >= and a < bound, got {req.specifier}"
    assert lower[0].release[:2] == installed.release[:2] and lower[0] <= installed, (dist, str(req.specifier))
    assert upper[0] <= Version(f"{installed.major}.{installed.minor + 1}"), (dist, str(req.specifier))
