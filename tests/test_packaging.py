"""Setting the package up prints no warning of the project's making: setuptools reads pyproject.toml without
one (it used to warn that ``project.license`` as a TOML table is deprecated)."""

import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_and_setuptools_is_new_enough_for_it():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in data["build-system"]["requires"]  # SPDX strings need setuptools 77


def test_setuptools_reads_the_project_config_without_warnings():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(setuptools.Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.name == "longroll"
