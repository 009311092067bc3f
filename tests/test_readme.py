"""The README's config table lists every config key (so a new key cannot go undocumented)."""

from pathlib import Path

from saekit.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_config_key_is_in_the_readme_table():
    text = README.read_text()
    missing = []
    for section, model in (
        ("source", Config.model_fields["source"]),
        ("sae", Config.model_fields["sae"]),
        ("train", Config.model_fields["train"]),
    ):
        for key in model.annotation.model_fields:
            if f"`{section}.{key}`" not in text:
                missing.append(f"{section}.{key}")
    assert not missing, f"undocumented config keys: {missing}"
