"""Package discovery only; all metadata lives in pyproject.toml.

Every package under ``igq_plugin/`` is found automatically, and the top-level ``integrations/``
folder (kept at the repository top level) is installed as ``igq_plugin.integrations`` with all of
its subpackages. pyproject.toml alone cannot express this: ``[tool.setuptools.packages.find]``
names packages after their folders, so ``integrations/`` would install as a top-level
``integrations`` package.
"""
from setuptools import find_packages, setup

core = find_packages(include=["igq_plugin", "igq_plugin.*"])
integrations = ["igq_plugin.integrations"] + [
    f"igq_plugin.integrations.{name}" for name in find_packages(where="integrations")
]

setup(
    packages=core + integrations,
    package_dir={"igq_plugin.integrations": "integrations"},
)
