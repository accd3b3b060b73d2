"""The project's own files agree with each other."""
from __future__ import annotations

import tomllib

import yaml
from helpers import ROOT

from tagger.cli import cli


def test_conda_yaml_pins_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(item["pip"] for item in conda if isinstance(item, dict))
    assert sorted(pip) == sorted(project)
    assert "python=3.11" in conda


def test_mlproject_entry_points_pass_only_options_their_command_has():
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert set(entry_points) <= {name.replace("-", "_") for name in cli.commands}
    for name, entry in entry_points.items():
        words = entry["command"].split()
        assert words[:3] == ["python", "-m", "tagger"], name
        command = cli.commands[words[3]]
        flags = {flag for param in command.params for flag in param.opts}
        passed = [word for word in words[4:] if word.startswith("--")]
        assert set(passed) <= flags, (name, set(passed) - flags)
        placeholders = {word.strip("{}") for word in words[4:] if word.startswith("{")}
        assert placeholders == set(entry["parameters"]), name


def test_no_build_module_shadows_an_installed_top_level_package():
    import importlib.util

    assert not (ROOT / "packaging" / "__init__.py").exists()
    for name in ("evaluate", "package", "registry", "runs", "gate", "cli", "training"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "packaging" not in str(spec.origin), name
