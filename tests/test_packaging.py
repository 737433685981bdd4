"""What users install: the sdist and the wheel hold every package, and the wheel works on its own.

The project is copied to a temporary folder (in-tree builds write ``build/`` and ``*.egg-info``), its
sdist is built, and the wheel is built from the unpacked sdist (as ``pip install igq_plugin-*.tar.gz``
and ``python -m build`` do). The wheel is then installed into a fresh venv with the source tree off
the path; that venv sees this environment's site-packages through a ``.pth`` file (torch is not
reinstalled; the editable install's finder is not active there, because ``.pth`` files inside a
directory named by a ``.pth`` file are not processed).

Expected packages are computed from the source tree: every directory with an ``__init__.py`` under
``igq_plugin/`` and under the top-level ``integrations/`` (installed as ``igq_plugin.integrations``).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the top-level source folders and the package name each one installs as
SOURCES = {"igq_plugin": "igq_plugin", "integrations": "igq_plugin.integrations"}
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    "*.pt", "*.safetensors", "*.whl", "*.tar.gz",
)


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _source_packages():
    """{dotted package name: source folder relative to ROOT} for every folder with an __init__.py."""
    found = {}
    for folder, name in SOURCES.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found[".".join((name, *rel.parts))] = init.parent.relative_to(ROOT).as_posix()
    return found


def _source_modules():
    """Wheel paths of every .py file that lives in a package folder of the source tree."""
    paths = set()
    for pkg, folder in _source_packages().items():
        for py in (ROOT / folder).glob("*.py"):
            paths.add(pkg.replace(".", "/") + "/" + py.name)
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist path, wheel path, fresh venv python) built from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)

    sdist_dir = tmp / "sdist"
    _run([sys.executable, "-c",
          f"from setuptools import build_meta; print(build_meta.build_sdist({str(sdist_dir)!r}))"], cwd=src)
    sdist = next(sdist_dir.glob("igq_plugin-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").glob("igq_plugin-*"))

    wheel_dir = tmp / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", wheel_dir, unpacked])
    wheel = next(wheel_dir.glob("igq_plugin-*.whl"))

    venv = tmp / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_igq_test_parent_env.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
    # -I (--ignore-installed): the parent env's igq_plugin is visible and must not be touched
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-I", "-q", wheel], cwd=tmp)
    return sdist, wheel, python


def test_sdist_contains_sources(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in ("pyproject.toml", "setup.py", "README.md"):
        assert rel in names, rel
    expected = {
        py.relative_to(ROOT).as_posix()
        for folder in _source_packages().values() for py in (ROOT / folder).glob("*.py")
    }
    missing = sorted(expected - names)
    assert not missing, f"sdist lacks sources: {missing}"


def test_wheel_lists_every_package(built):
    _, wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = _source_packages()
    assert {"igq_plugin", "igq_plugin.ops", "igq_plugin.allocation", "igq_plugin.integrations",
            "igq_plugin.integrations.openvino"} <= set(packages)
    missing = sorted(p for p in packages if p.replace(".", "/") + "/__init__.py" not in names)
    assert not missing, f"wheel lacks packages: {missing}"
    missing = sorted(_source_modules() - names)
    assert not missing, f"wheel lacks modules: {missing}"
    assert not any(n.startswith(("integrations/", "tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "igq = igq_plugin.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def test_installed_wheel_imports_and_quantizes(built, tmp_path):
    _, wheel, python = built
    packages = sorted(
        n[: -len("/__init__.py")].replace("/", ".")
        for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/__init__.py")
    )
    integrations = [p for p in packages if p.startswith("igq_plugin.integrations.")]
    assert integrations, packages
    venv = python.parent.parent
    code = textwrap.dedent(f"""
        import importlib, os, sys
        import igq_plugin as igq
        venv = os.path.realpath({str(venv)!r})
        def inside(module):
            return os.path.realpath(module.__file__).startswith(venv + os.sep)
        assert inside(igq), igq.__file__
        assert "igq_plugin.bench" not in sys.modules, "import igq_plugin imported igq_plugin.bench"
        for name in {packages!r}:
            module = importlib.import_module(name)
            assert inside(module), (name, module.__file__)
        for name in {integrations!r}:
            importlib.import_module(name)
        import torch
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
        config = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)
        qmodel = igq.quantize(model, config, [torch.randn(4, 10, 16) for _ in range(2)])
        with torch.no_grad():
            y = qmodel(torch.randn(4, 10, 16))
        assert y.shape == (4, 10, 8), y.shape
        assert torch.isfinite(y).all()
        assert any(isinstance(m, igq.QuantLinear) for m in qmodel.modules())
        # the torch.ao adapter's FX and pt2e flows, from the installed wheel
        import warnings
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from igq_plugin.integrations.torch_ao import IGQQuantizer, convert_igq_fx, prepare_igq_fx
        assert inside(sys.modules["igq_plugin.integrations.torch_ao.fx"])
        data = [torch.randn(4, 10, 16) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fx = prepare_igq_fx(model, config, (data[0],))
        pt2e = prepare_pt2e(torch.export.export(model, (data[0],)).module(), IGQQuantizer(config))
        with torch.no_grad():
            for x in data:
                fx(x), pt2e(x)
        fx, pt2e = convert_igq_fx(fx, progress=False), convert_pt2e(pt2e)
        assert inside(sys.modules["igq_plugin.integrations.torch_ao.pt2e"])
        core = igq.quantize(model, config, data, progress=False)
        with torch.no_grad():
            assert torch.equal(fx(data[0]), core(data[0])) and torch.equal(pt2e(data[0]), core(data[0]))
        print("ok", igq.__file__)
    """)
    out = _run([python, "-I", "-c", code], cwd=tmp_path, env=_clean_env())
    assert out.stdout.startswith("ok"), out.stdout


def test_installed_console_script(built, tmp_path):
    _, _, python = built
    igq = python.parent / "igq"
    assert igq.is_file()
    out = _run([igq, "--help"], cwd=tmp_path, env=_clean_env())
    assert "quantize" in out.stdout and "config" in out.stdout
