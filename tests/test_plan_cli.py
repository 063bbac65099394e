"""`gpu-extender plan`: a fleet file and a demand in, a plan, its savings and Deployments to apply out."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.cli import main
from policies.inventory import GpuDevice, MigInstance, NodeInventory
from scheduler.planner.cli import dns_name
from scheduler.planner.fleet import fleet_gpus, parse_prices, price_of

H100 = "NVIDIA-H100-80GB-HBM3"
SMALL = "meta-llama/Llama-3.2-1B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
FAST = ["--time-limit", "2", "--workers", "1"]
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _node(name: str, gpus: int) -> dict[str, Any]:
    resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    labels = {
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.product": H100,
        "nvidia.com/gpu.memory": "81559",
        "nvidia.com/gpu.count": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "status": {"capacity": resources, "allocatable": resources},
    }


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    """Two nodes of two H100-80GB each."""
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [_node("h-0", 2), _node("h-1", 2)]}))
    return path


def _demand(tmp_path: Path, rows: dict[str, float]) -> Path:
    path = tmp_path / "demand.csv"
    path.write_text("model,requests_per_second\n" + "".join(f"{m},{rps}\n" for m, rps in rows.items()))
    return path


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return int(match.group(1))


def _deployments(out: Path) -> list[dict[str, Any]]:
    text = (out / "deployments.yaml").read_text()
    assert text.startswith("#")  # says what the file holds and how to apply it
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _limits(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def _args(deployment: dict[str, Any]) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_plan_beats_one_replica_per_gpu_and_writes_a_deployment_per_model(tmp_path: Path, fleet: Path, capsys) -> None:
    demand = _demand(tmp_path, {SMALL: 20, QWEN: 6, LLAMA: 3})
    out = tmp_path / "out"
    code = main(
        ["plan", "--fleet", str(fleet), "--demand", str(demand), "--prices", "H100=2.5", "--out", str(out), *FAST]
    )
    printed = capsys.readouterr().out
    assert code == 0
    used = _number(r"GPUs used\s+(\d+) of 4", printed)
    assert used <= _number(r"vs one replica per GPU\s+(\d+) GPU", printed)
    assert _number(r"vs first-fit decreasing\s+(\d+) GPU", printed) >= used
    assert f"${2.5 * used:.2f}/h" in printed  # the price of every GPU used
    for name in (SMALL, QWEN, LLAMA):
        assert name in printed

    report = json.loads((out / "plan.json").read_text())
    assert report["gpus_used"] == used and report["fleet_gpus"] == 4
    planned = {m["model"]: m for m in report["models"]}
    deployments = _deployments(out)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for d in deployments:
        assert d["apiVersion"] == "apps/v1" and d["kind"] == "Deployment"
        assert DNS_LABEL.fullmatch(d["metadata"]["name"])
        by_model.setdefault(d["spec"]["template"]["metadata"]["annotations"]["gpu-extender.io/model"], []).append(d)
    assert set(by_model) == {SMALL, QWEN, LLAMA}
    assert [d["name"] for d in report["deployments"]] == [d["metadata"]["name"] for d in deployments]
    for model, ds in by_model.items():
        assert len(ds) == len(planned[model]["placements"])  # one per kind of resource: here one per model
        assert sum(d["spec"]["replicas"] for d in ds) == planned[model]["replicas"]
        for d in ds:
            annotations = d["spec"]["template"]["metadata"]["annotations"]
            assert annotations["gpu-extender.io/gpu-memory"].endswith("Mi")
            args = _args(d)
            assert args[args.index("--model") + 1] == model
            assert args[args.index("--served-model-name") + 1] == model
            assert "--gpu-memory-utilization" in args
            (resource, quantity), *rest = _limits(d).items()
            assert not rest
            assert (
                resource == "nvidia.com/gpu"
                or resource.startswith("nvidia.com/mig-")
                or (resource == "gpu-extender.io/gpu-milli" and int(quantity) % 10 == 0 and int(quantity) >= 10)
            )
    # Three models on fewer GPUs than replicas: some share a GPU, and those read vLLM's fraction from the extender.
    shared = [d for d in deployments if "gpu-extender.io/gpu-milli" in _limits(d)]
    assert shared
    for d in shared:
        env = d["spec"]["template"]["spec"]["containers"][0]["env"]
        assert env[0]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['gpu-extender.io/gpu-memory-fraction']")
        assert _args(d)[-1] == f"$({env[0]['name']})"


def test_yaml_demand_and_mig(tmp_path: Path, fleet: Path, capsys) -> None:
    """With --allow-mig the GPUs are carved: the model takes a MIG slice, and its Deployment asks for that profile."""
    demand = tmp_path / "demand.yaml"
    demand.write_text(yaml.safe_dump({SMALL: 5}))
    out = tmp_path / "out"
    code = main(["plan", "--fleet", str(fleet), "--demand", str(demand), "--allow-mig", "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    where = re.search(r"(\dg\.\d+gb)@\d", printed)
    assert where, printed
    (deployment,) = _deployments(out)
    assert deployment["spec"]["replicas"] == 1
    assert _limits(deployment) == {f"nvidia.com/mig-{where.group(1)}": "1"}
    assert _args(deployment)[-1] == "0.9"


def test_request_trace(tmp_path: Path, fleet: Path, capsys) -> None:
    trace = tmp_path / "trace.csv"
    rows = ["timestamp,model,service_time"]
    for second in range(0, 300, 2):
        rows.append(f"{second},{SMALL},0.2")
        if second % 6 == 0 or second > 200:
            rows.append(f"{second + 1},{QWEN},0.5")
    trace.write_text("\n".join(rows) + "\n")
    code = main(["plan", "--fleet", str(fleet), "--requests", str(trace), "--trace-step", "30", *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    assert SMALL in printed and QWEN in printed
    assert _number(r"GPUs used\s+(\d+)", printed) >= 1


def test_unknown_model_is_named_with_the_catalog(tmp_path: Path, fleet: Path, capsys) -> None:
    demand = _demand(tmp_path, {SMALL: 1, "acme/NoSuchModel-7B": 2})
    assert main(["plan", "--fleet", str(fleet), "--demand", str(demand), *FAST]) == 2
    err = capsys.readouterr().err
    assert "acme/NoSuchModel-7B" in err and LLAMA in err  # the unknown name, then the names the catalog has
    assert "Traceback" not in err


def test_model_too_big_for_the_fleet(tmp_path: Path, fleet: Path, capsys) -> None:
    demand = _demand(tmp_path, {SMALL: 1, "Qwen/Qwen2.5-72B-Instruct": 1})
    assert main(["plan", "--fleet", str(fleet), "--demand", str(demand), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no GPU or MIG slice of the fleet" in err and "Qwen/Qwen2.5-72B-Instruct" in err


def test_demand_beyond_the_fleet(tmp_path: Path, fleet: Path, capsys) -> None:
    demand = _demand(tmp_path, {SMALL: 1000})
    assert main(["plan", "--fleet", str(fleet), "--demand", str(demand), *FAST]) == 2
    assert "cannot carry the demand" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fleet_text", "demand_text", "expected"),
    [
        (None, "x,1\n", "fleet"),
        ("apiVersion: v1\nkind: List\nitems: [\n", f"{SMALL},1\n", "not valid YAML"),
        ("apiVersion: v1\nkind: List\nitems: []\n", f"{SMALL},1\n", "no GPUs"),
        ("", f"{SMALL},fast\n", "line 1"),
    ],
)
def test_unreadable_inputs_are_refused_with_their_path(
    tmp_path: Path, fleet: Path, capsys, fleet_text: str | None, demand_text: str, expected: str
) -> None:
    path = tmp_path / "other-fleet.yaml"
    if fleet_text:
        path.write_text(fleet_text)
    chosen = fleet if fleet_text == "" else path
    demand = tmp_path / "demand.csv"
    demand.write_text(demand_text)
    assert main(["plan", "--fleet", str(chosen), "--demand", str(demand), *FAST]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert str(chosen) in err or str(demand) in err


def test_fleet_prices_and_mig_modes() -> None:
    prices = parse_prices("H100=2.5, A100=1.6, A100-80GB=2.0")
    assert price_of(H100, prices) == 2.5
    assert price_of("NVIDIA-A100-SXM4-80GB", prices) == 2.0  # the more specific entry
    assert price_of("NVIDIA-A100-SXM4-40GB", prices) == 1.6
    assert price_of("NVIDIA-L40S", prices) == 1.0
    with pytest.raises(ValueError, match="H100"):
        parse_prices("H100:2.5")
    node = NodeInventory(
        "n",
        64_000,
        512_000,
        (
            GpuDevice(0, H100, 81559),
            GpuDevice(1, H100, 81559, mig_table="H100-80GB", mig_instances=(MigInstance("3g.40gb", 4),)),
            GpuDevice(2, H100, 81559, mig_table="H100-80GB"),
            GpuDevice(3, "NVIDIA-L40S", 0),
        ),
    )
    whole, carved, empty, l40s = fleet_gpus([node], prices)
    assert (whole.mig_table, carved.mig_layout, empty.mig_table, empty.mig_layout) == (
        None,
        (("3g.40gb", 4),),
        "H100-80GB",
        None,
    )
    assert l40s.memory_mib > 40_000 and l40s.price_per_hour == 1.0  # datasheet memory where the inventory has none
    allowed = fleet_gpus([node], prices, allow_mig=True)
    assert [g.mig_table for g in allowed] == ["H100-80GB", "H100-80GB", "H100-80GB", None]


def test_deployment_names_are_dns_labels() -> None:
    assert dns_name(SMALL) == "meta-llama-llama-3-2-1b-instruct"
    assert dns_name("Org_Name/Model.v2") == "org-name-model-v2"
    long = dns_name("a/" + "b" * 80)
    assert len(long) <= 63 and DNS_LABEL.fullmatch(long)
