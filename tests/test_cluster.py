"""cluster/: every YAML is a valid Ray cluster config (Ray's own schema, offline), the commands in the files' headers
are the README's, and nothing turns token authentication off or listens on all interfaces."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
SCRIPTS = sorted(CLUSTER.glob("*.sh"))
CLUSTER_FILES = YAMLS + [CLUSTER / "local.sh"]


def header_commands(path: Path) -> list[str]:
    """The `#   $ command` lines of a file's leading comment block."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+\$ (.+)$", line)
        if m:
            out.append(m.group(1).strip())
    return out


def readme_commands(name: str) -> list[str]:
    """The command lines of the README code block whose first line is `# cluster/<name>...`."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = block.strip().splitlines()
        if lines and re.match(rf"# cluster/{re.escape(name)}\b", lines[0]):
            return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    raise AssertionError(f"README.md has no ```bash block starting with `# cluster/{name}`")


def all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in (cfg.get(k) or [])]
    for t in (cfg.get("available_node_types") or {}).values():
        cmds += [c for k in keys for c in (t.get(k) or [])]
    return cmds


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_yaml_validates_against_rays_schema(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    # as `ray up` sees it: the provider's defaults filled in, then Ray's own check
    filled = prepare_config(copy.deepcopy(raw))
    validate_config(filled)
    # what `ray up` runs comes from this file, not from the provider's defaults (AWS's open --dashboard-host=0.0.0.0)
    assert filled["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert filled["worker_start_ray_commands"] == raw["worker_start_ray_commands"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_readme_and_header_give_the_same_commands(path):
    header = header_commands(path)
    assert any(c.startswith("RAY_AUTH_MODE=token ray job submit") for c in header), f"{path.name}: no submit command"
    assert header == readme_commands(path.name)
    if path.suffix == ".yaml":
        for verb in ("ray up -y", "ray dashboard", "ray dashboard -p 5000 --remote-port 5000", "ray down -y"):
            assert f"{verb} cluster/{path.name}" in header, f"{path.name}: no `{verb}` command"
        assert "ray get-auth-token --generate" in header


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_token_auth_on_and_nothing_on_all_interfaces(path):
    cfg = yaml.safe_load(path.read_text())
    cmds = all_commands(cfg)
    starts = [c for c in cmds if re.search(r"\bray start\b", c)]
    assert any("--head" in c for c in starts) and len(starts) == 1 + bool(cfg["worker_start_ray_commands"])
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c, f"{path.name}: `ray start` without token auth: {c}"
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    # the token reaches every node the way Ray's docs do it: file_mounts of ~/.ray/auth_token
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # an MLflow server on the head, on loopback, its store in the run folders
    assert any("cluster/mlflow.sh start /" in c or "cluster/mlflow.sh start $HOME/" in c
               for c in cfg["head_start_ray_commands"])
    # the project and its pinned versions on every node
    assert any("-c ~/condensation/cluster/constraints-gpu.txt -e ~/condensation" in c for c in cfg["setup_commands"])
    sg = cfg["provider"].get("security_group", {})
    for rule in sg.get("IpPermissions", []):
        assert not any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule


def test_h100_storage_is_shared_and_is_the_submitted_run_storage():
    cfg = yaml.safe_load((CLUSTER / "h100.yaml").read_text())
    assert "-v /mnt/efs:/mnt/efs" in cfg["docker"]["run_options"]
    assert any("mount -t nfs4" in c and ":/ /mnt/efs" in c for c in cfg["initialization_commands"])
    storage = "/mnt/efs/condensation-runs/runs"
    submit = next(c for c in header_commands(CLUSTER / "h100.yaml") if "ray job submit" in c)
    assert submit.endswith(f"train.run.storage={storage}")
    assert f"cluster/mlflow.sh start {storage}" in " ".join(cfg["head_start_ray_commands"])
    # a job without the override lands there too (relative storage goes under ~/condensation-runs in a job)
    assert any("ln -s /mnt/efs/condensation-runs ~/condensation-runs" in c for c in cfg["setup_commands"])
    assert cfg["max_workers"] == cfg["available_node_types"]["gpu_8xh100"]["max_workers"] == 8
    assert cfg["available_node_types"]["gpu_8xh100"]["min_workers"] == 0


@pytest.mark.parametrize("path", YAMLS + SCRIPTS, ids=lambda p: p.name)
def test_no_config_disables_auth_or_binds_all_interfaces(path):
    text = path.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "RAY_AUTH_MODE=disabled" not in text
    assert "0.0.0.0" not in code and "::/0" not in code
    assert "--disable-security-middleware" not in code
    for m in re.finditer(r"--(?:dashboard-)?host[ =](\S+)", code):
        assert m.group(1) in ("127.0.0.1", "localhost"), f"{path.name}: {m.group(0)}"
    for m in re.finditer(r"\bmlflow server\b", code):
        assert "--host 127.0.0.1" in code[m.start():m.start() + 200]


def test_local_script_starts_ray_with_a_token_on_loopback():
    code = (CLUSTER / "local.sh").read_text()
    start = next(ln for ln in code.splitlines() if "ray start --head" in ln)
    assert start.strip().startswith("RAY_AUTH_MODE=token ray start --head")
    assert "--node-ip-address=127.0.0.1" in start and "--dashboard-host=127.0.0.1" in start
    assert "ray get-auth-token --generate" in code
    assert 'mlflow.sh" start "$HOME/condensation-runs/runs"' in code
