"""A built wheel ships igq_plugin.integrations (mapped from the top-level integrations/ folder)."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_integrations(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("igq_plugin-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("igq_plugin/__init__.py", "igq_plugin/ops/__init__.py", "igq_plugin/integrations/__init__.py",
                "igq_plugin/integrations/openvino/__init__.py"):
        assert pkg in names, pkg
    assert any(n.endswith("entry_points.txt") for n in names)
