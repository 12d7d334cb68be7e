"""The documentation: the configuration reference matches the settings models, the
site builds with no warning (a dead link or a page missing from the navigation fails),
and the README's links lead somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_matches_the_settings_models():
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [Path(sys.executable).with_name("mkdocs"), "build", "--strict", "-d", tmp_path / "site"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()


def test_the_readme_links_to_files_that_exist():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert targets, "the README links to the documentation"
    missing = [t for t in targets if "://" not in t and not (REPO / t).exists()]
    assert missing == []
