"""Every shipped cluster config parses and names what `ray up` needs; every workload and dashboard documents its
command."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yaml_loads(path):
    cfg = yaml.safe_load(path.read_text())
    for key in ("cluster_name", "provider", "head_start_ray_commands", "setup_commands"):
        assert key in cfg, f"{path.name}: missing {key}"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("path", sorted([*(ROOT / "workloads").glob("*.py"), *(ROOT / "dashboards").glob("*.py")]),
                         ids=lambda p: p.name)
def test_workload_docstring_gives_its_command(path):
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"{path.parent.name}/{path.name}" in doc, f"{path.name}: the docstring must give the command that runs it"
