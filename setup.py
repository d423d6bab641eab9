from setuptools import find_packages, setup

# Metadata and dependencies live in pyproject.toml; this file keeps `pip install -e .` working with old pips.
setup(packages=find_packages(exclude=["paper_assets_tests*"]))
