"""Packages are found, not listed: each top-level folder is a subpackage of `tandem`
(`sdk/` installs as `tandem.sdk`, `sdk/cli/` as `tandem.sdk.cli`, ...), and folders of data
inside them (trained router weights, the playground's static files) ship with them. Everything
else about the distribution is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

ROOTS = ("protocols", "local_runtime", "remote_gateway", "routing", "sdk")
DATA = ("*.npz", "*.npy", "*.json", "*.jsonl", "*.csv", "*.html", "*.css", "*.js", "*.svg", "*.png", "*.md", "*.yaml")

package_dir = {f"tandem.{root}": root for root in ROOTS}
packages = [
    name
    for root in ROOTS
    for name in (f"tandem.{root}", *(f"tandem.{root}.{p}" for p in find_namespace_packages(root, exclude=["*__pycache__*"])))
]

setup(package_dir=package_dir, packages=packages, package_data={name: list(DATA) for name in packages})
