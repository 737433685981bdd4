"""Layering: the core imports no optional framework; adapters import lazily with a clear error."""
import subprocess
import sys

import pytest

OPTIONAL = ("transformers", "nncf", "openvino", "timm", "triton", "torchvision", "onnx")


def test_import_igq_plugin_imports_no_optional_framework():
    code = (
        "import sys, igq_plugin, igq_plugin.integrations, igq_plugin.bench.zoo, igq_plugin.bench.data, igq_plugin.cli\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing igq_plugin imported optional frameworks: {out.stdout}"


@pytest.mark.parametrize("name", ["torch_ao", "nncf", "transformers", "openvino", "cuda"])
def test_integration_packages_importable(name):
    __import__(f"igq_plugin.integrations.{name}")


def test_require_names_the_extra():
    from igq_plugin.integrations import require

    with pytest.raises(ImportError, match=r'pip install "igq_plugin\[openvino\]"'):
        require("surely_not_an_installed_module_xyz", "openvino")
