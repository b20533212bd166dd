"""The version the package reports is the one it is built as (pyproject.toml), read from a leaf module."""
import re
from pathlib import Path

import sparsenet
from sparsenet._version import __version__


def test_version_matches_the_build_metadata():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]  # (tomllib is Python 3.11+)
    assert __version__ == sparsenet.__version__ == re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)
