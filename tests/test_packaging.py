"""A non-editable install carries everything the audit reads at run time (templates, suites, lexicon, bundled
models with their relevance matrices, calibrated thresholds), not only a checkout."""

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
        "import auditor, auditor.resources as r\n"
        "from auditor.zoo import bundled_models\n"
        "from auditor.thresholds import CALIBRATED\n"
        "assert r.templates_dir().joinpath('report.html.j2').is_file()\n"
        "assert r.suites_dir().joinpath('shapes-default.yaml').is_file()\n"
        "assert CALIBRATED.parent == __import__('pathlib').Path(auditor.__file__).parent\n"
        "ms = bundled_models(); assert ms\n"
        "for m in ms: assert (m.path / 'unet' / 'diffusion_pytorch_model.safetensors').is_file(), m\n"
        "print(auditor.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
    for name in ("thresholds.json", "zoo/models/shapes-v1/relevance.npz", "lexicon"):
        assert (target / "auditor" / name).exists() == (ROOT / "auditor" / name).exists(), name
