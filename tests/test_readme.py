"""The README is the user's manual: every setting, default, component and law it must document."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from nanollm.budget import LAWS
from nanollm.components import REGISTRY
from nanollm.ir import ModelConfig, format_value

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_documented_with_its_default():
    for field in dataclasses.fields(ModelConfig):
        default = format_value(field.default).replace("1e-06", "1e-6").replace("1000000.0", "1e6")
        assert f"| `{field.name}` | {default} |" in README, field.name


def test_every_component_argument_and_law_is_documented():
    for name, spec in REGISTRY.items():
        assert f"`{name}" in README, name
        for param in spec.params:
            assert f"`{param.name}`" in README, (name, param.name)
    for name in LAWS:
        assert f"`{name}`" in README, name
    assert "`tokens-per-param=R`" in README


def test_every_recipe_key_is_documented_with_its_default():
    import json

    from nanollm.train.recipe import Recipe

    for field in dataclasses.fields(Recipe):
        assert f"| `{field.name}` | {json.dumps(field.default)} | {field.metadata['doc']} |" in README, field.name


def test_the_main_job_is_nanollm_train():
    assert "pip install torch==2.13.0 && pip install -e . && nanollm train archs/qwen3_tiny.arch" in README
    assert (Path(__file__).parent.parent / "archs" / "qwen3_tiny.arch").is_file()
