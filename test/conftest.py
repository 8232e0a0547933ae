"""Shared fixtures. Tests import the installed package (see Makefile); config/ and test/data
come from the checkout."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def package_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_bag() -> Path:
    return REPO / "test" / "data" / "demo_bag"


@pytest.fixture(scope="session")
def default_params() -> Path:
    return REPO / "config" / "default.yaml"
