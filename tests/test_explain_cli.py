"""`gpu-extender explain` against a fleet file: the verdicts a user reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from extender.cli import main
from tests.test_wire_replay import FLEET


def test_explain_prints_the_best_nodes_and_the_reasons(tmp_path: Path, capsys) -> None:
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "default",
            "uid": "u",
            "annotations": {"gpu-extender.io/gpu-types": "H100"},
        },
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
    }
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    assert main(["explain", str(path), "--fleet", str(FLEET)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 of 4 nodes fit")
    assert "gpu-b" in out and "gpu-c" in out and "[0, 1, 2, 3, 4, 5, 6, 7]" in out
    assert "2 nodes: GPU model not allowed by the pod" in out
