"""The limits are settings a user can find: each one a flag, an environment variable and a README row."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from gitd.settings import Settings
from pipeline.limits import Limits, _shown


def test_each_limit_is_a_flag_and_a_readme_row_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    usage = subprocess.run([sys.executable, "-m", "gitd.cli", "up", "--help"], capture_output=True, text=True,
                           cwd=ROOT, check=True).stdout
    for name, field in Limits.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in usage, flag
        assert f"| `{flag}` | {_shown(name, field.default)} | {field.description} |" in readme, flag


def test_a_limit_comes_from_the_environment_and_refuses_in_its_own_words(monkeypatch) -> None:
    monkeypatch.setenv("DEVFLOW_MAX_CONFIG_BYTES", "2048")
    limits = Settings().limits()
    assert limits.max_config_bytes == 2048
    assert str(limits.refuse("max_config_bytes", "the config vars would take 4000 bytes")) == (
        "the config vars would take 4000 bytes: the limit is 2 KiB (an admin can raise it with devflow up "
        "--max-config-bytes)")
