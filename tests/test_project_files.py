"""The project's own files agree with each other."""
from __future__ import annotations

import tomllib

import yaml
from conftest import ROOT


def test_conda_yaml_pins_what_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    pip = next(item["pip"] for item in conda if isinstance(item, dict))
    assert sorted(pip) == sorted(project)
    assert "python=3.11" in conda


def test_mlproject_entry_points_exist_in_the_cli():
    from click.testing import CliRunner

    from cli import cli

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, entry in entry_points.items():
        command = entry["command"].split()
        assert command[:2] == ["python", "packaging/cli.py"], name
        result = CliRunner().invoke(cli, [command[2], "--help"])
        assert result.exit_code == 0, (name, result.output)
        for flag in (word for word in command[3:] if word.startswith("--")):
            assert flag in result.output, (name, flag)
