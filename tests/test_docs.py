"""The manual: every config key is described and listed in the generated reference, the README's Python example
runs, and the MkDocs site builds with --strict."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saekit.config import Config

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "config_reference.py"


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_fields():
    """(section, key, FieldInfo) for every key of every section, read from the models themselves."""
    for section, field in Config.model_fields.items():
        for key, info in field.annotation.model_fields.items():
            yield section, key, info


def test_config_has_the_three_sections():
    assert {"source", "sae", "train"} <= set(Config.model_fields)


def test_every_config_key_has_a_description():
    missing = [f"{section}.{key}" for section, key, info in _config_fields() if not (info.description or "").strip()]
    assert not missing, f"config keys without Field(description=...): {missing}"


def test_generated_reference_lists_every_key_with_its_default():
    hook = _hook()
    text = hook.render_reference()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    keys = [(section, key, info) for section, key, info in _config_fields()]
    assert len(rows) == len(keys)
    for section, key, info in keys:
        row = rows[f"`{section}.{key}`"]
        assert f"`{hook.default_text(info)}`" in row
    assert '| `"mean" | "sum"` | `mean` |' in rows["`sae.l1_reduction`"]  # the type lists both choices
    assert "`256`" in rows["`train.batch_size`"] and "`int`" in rows["`train.batch_size`"]


def test_configuration_page_holds_the_placeholder_the_hook_replaces():
    page = (ROOT / "docs" / "configuration.md").read_text()
    hook = _hook()
    assert hook.PLACEHOLDER in page
    rendered = hook.on_page_markdown(page)
    assert hook.PLACEHOLDER not in rendered and "`train.samples`" in rendered


def test_descriptions_are_escaped_for_markdown_tables():
    hook = _hook()
    assert hook._cell("tokens |x| above k*B, see `a|b`") == "tokens \\|x\\| above k\\*B, see `a|b`"
    assert hook.type_name(int | list[int]) == "int | list[int]"
    assert hook.type_name(str | None) == "str | null"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's ```python blocks, run as they are from a folder holding the repository's configs."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no ```python example"
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    rows = namespace["rows"]
    assert [row["l1"] for row in rows] == [0.5, 1.0]
    # configs/small.yaml at 200k samples: MMCS 0.986 and 0.997 when the example was written
    assert all(row["mmcs"] > 0.9 for row in rows), [row["mmcs"] for row in rows]
    assert "MMCS" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_mkdocs_build_is_strict_clean(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a bound on a hang (busy shared cores), not a timing assertion
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "source.kind" in reference and "train.samples" in reference
    assert (tmp_path / "site" / "reference" / "api" / "index.html").is_file()
