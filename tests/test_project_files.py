"""The project's own files agree with each other."""
from __future__ import annotations

import re
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


def test_build_side_finds_the_runtime_package_and_shipped_dataset_by_import():
    """What a wheel installed anywhere needs: no path leads out of the installed packages to a source checkout."""
    from importlib import resources
    from pathlib import Path

    import mlflow_model
    import tagger
    from tagger.bundle import PYFUNC_FILE
    from tagger.config import SHIPPED_DATASET
    from tagger.sessions import BUILD_PACKAGE, RUNTIME_PACKAGE

    build_package = Path(tagger.__file__).resolve().parent
    assert RUNTIME_PACKAGE == Path(mlflow_model.__file__).resolve().parent
    assert BUILD_PACKAGE == build_package
    assert PYFUNC_FILE.is_file() and PYFUNC_FILE.parent == RUNTIME_PACKAGE
    assert SHIPPED_DATASET == Path(str(resources.files("tagger") / "datasets" / "projects.csv"))
    assert SHIPPED_DATASET.is_file() and SHIPPED_DATASET.resolve().is_relative_to(build_package)
    assert SHIPPED_DATASET.read_text().splitlines()[0].split(",")[:4] == ["id", "title", "description", "tag"]
    assert not (ROOT / "data").exists()
    # no module reaches past its own package through its file's location
    leaves = re.compile(r"parents\[|\.parent\.parent|dirname\(\s*(os\.path\.)?dirname|['\"]\.\.['\"]")
    for folder in (ROOT / "mlflow_model", ROOT / "packaging" / "tagger"):
        for module in folder.rglob("*.py"):
            for number, line in enumerate(module.read_text().splitlines(), 1):
                assert "parents[" not in line, f"{module}:{number}: {line.strip()}"
                assert not ("__file__" in line and leaves.search(line)), f"{module}:{number}: {line.strip()}"


def test_the_wheel_holds_every_package_and_the_shipped_dataset():
    """pyproject lists each package and subpackage (setuptools adds no other) and the dataset as package data."""
    import fnmatch

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"mlflow_model": "mlflow_model", "tagger": "packaging/tagger"}
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert sorted(setuptools["packages"]) == sorted(found)
    patterns = setuptools["package-data"]["tagger"]
    datasets = ROOT / "packaging" / "tagger" / "datasets"
    shipped = [path.relative_to(datasets.parent).as_posix() for path in datasets.iterdir()]
    assert "datasets/projects.csv" in shipped
    assert all(any(fnmatch.fnmatch(name, p) for p in patterns) for name in shipped), (shipped, patterns)
