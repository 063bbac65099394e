"""Every verb under malformed and odd requests (the strategies and checks of `e2e/fuzz_verbs.py`, bounded for CI;
`make fuzz` runs 10,000 cases): no 5xx, no hang, every 200 the protocol's answer, every refusal a 400 with a short
`Error`, no traceback in the log. Then one regression test per defect an earlier fuzz run found."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scheduler.binder
import scheduler.service
from e2e.fuzz_verbs import SEEDS, VERBS, Case, Target, cases, check, deep, encode

settings.register_profile(
    "fuzz-ci", max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "fuzz-long", max_examples=2_000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
PROFILE = settings.get_profile(os.environ.get("GPU_EXTENDER_FUZZ_PROFILE", "fuzz-ci"))


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    running = Target()
    yield running
    running.close()


@pytest.mark.parametrize("verb", VERBS)
@settings(PROFILE)
@given(data=st.data())
def test_every_verb_survives_malformed_requests(target: Target, verb: str, data: st.DataObject) -> None:
    check(target, data.draw(cases(verb)))


# -- the checks themselves catch what they claim to ----------------------------------------------------------------
def test_check_flags_a_crash_answered_as_a_protocol_error(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    service = target.clients["builtin"].app.state.service

    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "filter", broken)
    with pytest.raises(AssertionError, match="traceback or an ERROR"):
        check(target, Case("filter", encode(SEEDS["filter"][0]), "application/json", "builtin"))


def test_check_flags_an_answer_that_is_not_the_protocols(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    service = target.clients["builtin"].app.state.service
    monkeypatch.setattr(service, "prioritize", lambda pod, names: [(n, 11) for n in names])
    with pytest.raises(AssertionError, match="Score"):
        check(target, Case("prioritize", encode(SEEDS["prioritize"][0]), "application/json", "builtin"))
    monkeypatch.setattr(service, "preempt", lambda pod, candidates: {"gpu-p": ["someone-else"]})
    with pytest.raises(AssertionError, match="added victims"):
        check(target, Case("preempt", encode(SEEDS["preempt"][0]), "application/json", "builtin"))


# -- regressions ---------------------------------------------------------------------------------------------------
def post(target: Target, verb: str, body: Any, policy: str = "builtin") -> tuple[int, Any]:
    """Send one body, check every fuzz property, and return the status and the parsed answer."""
    case = Case(verb, body if isinstance(body, bytes) else encode(body), "application/json", policy)
    status, _, answer = check(target, case)
    return status, answer


def pod_with(**changes: Any) -> dict[str, Any]:
    pod = copy.deepcopy(SEEDS["filter"][0]["Pod"])
    pod["spec"].update(changes.pop("spec", {}))
    pod.update(changes)
    return pod


def requests(pod: dict[str, Any], resources: dict[str, Any]) -> dict[str, Any]:
    pod["spec"]["containers"][0]["resources"] = {"requests": resources, "limits": {}}
    return pod


NAMES = ["gpu-a", "gpu-b", "gpu-c", "gpu-p"]
VICTIMS = {"gpu-p": {"Pods": [{"UID": "01a12396-9a4a-4bc6-b342-e3e375d65e44"}], "NumPDBViolations": 0}}


@pytest.mark.parametrize("verb", ["filter", "prioritize", "explain"])
@pytest.mark.parametrize("item", [{"metadata": None}, {"metadata": {"name": 5}}, {}, 7])
def test_nodes_without_a_name_are_a_malformed_body(target: Target, verb: str, item: Any) -> None:
    """Was a 500 (`ExtenderArgs.node_names` raised before the error handler) or, for a number, an answer that
    failed to encode."""
    status, answer = post(target, verb, {"Pod": {}, "Nodes": {"items": [item]}})
    assert status == 400 and "Nodes.items[0] must be a Node with a metadata.name string" in answer["Error"]


def test_numeric_node_names_are_refused(target: Target) -> None:
    status, answer = post(target, "filter", {"Pod": SEEDS["filter"][0]["Pod"], "NodeNames": ["gpu-a", 5]})
    assert status == 400 and "NodeNames.1" in answer["Error"]


def test_preempt_victims_without_metadata(target: Target) -> None:
    """Was a 500 (`Victims.meta` called `.get` on null)."""
    body = {"Pod": SEEDS["preempt"][0]["Pod"], "NodeNameToVictims": {"gpu-p": {"Pods": [{"metadata": None}, {}]}}}
    status, answer = post(target, "preempt", body)
    assert status == 200 and set(answer) == {"NodeNameToMetaVictims"}
    body["NodeNameToVictims"]["gpu-p"]["Pods"] = [{"metadata": 2}]
    status, answer = post(target, "preempt", body)
    assert status == 400 and "metadata must be an object" in answer["Error"]


@pytest.mark.parametrize("verb", ["filter", "prioritize", "preempt", "explain"])
@pytest.mark.parametrize(
    ("metadata", "needle"),
    [(2, "metadata must be an object, not int"), ({"uid": deep(1000)}, "metadata.uid must be a string, not list")],
)
def test_a_pod_without_readable_identity_is_a_malformed_body(
    target: Target, verb: str, metadata: Any, needle: str
) -> None:
    """Was a 500 on explain and "internal error" (a traceback at ERROR) on the others: `"metadata": 2`, or a UID
    nested 1,000 levels deep (its repr blew the recursion limit)."""
    body: dict[str, Any] = {"Pod": pod_with(metadata=metadata), "NodeNames": NAMES}
    if verb == "preempt":
        body = {"Pod": body["Pod"], "NodeNameToMetaVictims": VICTIMS}
    status, answer = post(target, verb, body)
    assert status == 400 and needle in answer["Error"]


@pytest.mark.parametrize("terms", [5, "x", [{"matchExpressions": 3}], [{"matchExpressions": [{"values": 1}]}]])
def test_node_affinity_of_the_wrong_shape(target: Target, terms: Any) -> None:
    """`nodeSelectorTerms: 5` was a 500 on explain and "internal error" on filter."""
    expressions = [{"key": "nvidia.com/gpu.product", "operator": "In", "values": 1}]
    if terms == [{"matchExpressions": [{"values": 1}]}]:
        terms = [{"matchExpressions": expressions}]
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}
    pod = pod_with(spec={"affinity": affinity})
    status, answer = post(target, "explain", {"Pod": pod})
    assert status == 400 and "must be a list" in answer["Error"]
    status, answer = post(target, "filter", {"Pod": pod, "NodeNames": NAMES})
    assert status == 200 and answer["NodeNames"] == []
    assert "cannot read the pod's request" in answer["FailedAndUnresolvableNodes"]["gpu-a"]


@pytest.mark.parametrize("verb", ["filter", "prioritize", "explain"])
def test_a_quantity_nested_deep_is_an_unreadable_pod(target: Target, verb: str) -> None:
    """Was "internal error: RecursionError" (the error message took the value's repr)."""
    pod = requests(pod_with(), {"nvidia.com/gpu": deep(1000)})
    status, answer = post(target, verb, {"Pod": pod, "NodeNames": NAMES})
    if verb == "filter":
        assert status == 200
        assert "invalid quantity a list" in answer["FailedAndUnresolvableNodes"]["gpu-a"]
    elif verb == "prioritize":
        assert status == 200 and {a["Score"] for a in answer} == {0}
    else:
        assert status == 400 and "invalid quantity a list" in answer["Error"]


@pytest.mark.parametrize(
    ("resources", "annotations", "needle"),
    [
        ({"nvidia.com/gpu": "9" * 400}, {}, "longer than 64 characters"),
        ({"gpu-extender.io/gpu-milli": "500"}, {"gpu-extender.io/gpu-memory": "9" * 1_000_000}, "longer than 64"),
        ({"nvidia.com/mig-1g.10gb": "1e30"}, {}, "beyond what any node can hold"),
        ({"nvidia.com/gpu": "1", "cpu": "9e15"}, {}, "total cpu request is beyond"),
    ],
)
@pytest.mark.parametrize("verb", ["filter", "prioritize", "explain", "bind"])
def test_absurd_quantities_are_refused_before_they_overflow(
    target: Target, verb: str, resources: dict[str, str], annotations: dict[str, str], needle: str
) -> None:
    """A 400-digit quantity passed the grammar and overflowed later ("internal error: OverflowError"); a million
    digits overflowed `Decimal`."""
    pod = requests(pod_with(), resources)
    pod["metadata"]["annotations"] = annotations
    pod["metadata"]["uid"] = f"absurd-{verb}-{len(str(resources))}"
    if "cpu" in resources:  # each container in range, their sum not
        pod["spec"]["containers"].append(copy.deepcopy(pod["spec"]["containers"][0]))
    if verb == "bind":  # the bind reads the pod it has not seen from the binder
        target.clients["builtin"].app.state.service.binder.add_pod(pod)
        meta = pod["metadata"]
        body = {"PodName": meta["name"], "PodNamespace": "default", "PodUID": meta["uid"], "Node": "gpu-a"}
        status, answer = post(target, "bind", body)
        assert status == 200 and needle in answer["Error"]
        return
    status, answer = post(target, verb, {"Pod": pod, "NodeNames": NAMES})
    if verb == "filter":
        assert status == 200 and needle in answer["FailedAndUnresolvableNodes"]["gpu-b"]
        assert len(answer["FailedAndUnresolvableNodes"]["gpu-b"]) <= 500
    elif verb == "prioritize":
        assert status == 200 and {a["Score"] for a in answer} == {0}
    else:
        assert status == 400 and needle in answer["Error"]


def test_bind_of_a_pod_never_seen_is_a_bind_error(target: Target, caplog: pytest.LogCaptureFixture) -> None:
    """Answered "internal error" with a traceback: the binder's `BindError` was another class than the one the HTTP
    layer catches."""
    assert scheduler.service.BindError is scheduler.binder.BindError
    body = {"PodName": "nobody", "PodNamespace": "default", "PodUID": "u-nobody", "Node": "gpu-a"}
    with caplog.at_level(logging.INFO):
        status, answer = post(target, "bind", body)
    assert status == 200 and answer == {"Error": "pod default/nobody is not known"}
    assert [r.levelname for r in caplog.records if r.name == "gpu_extender.http"] == ["WARNING"]


@pytest.mark.parametrize("verb", ["prioritize", "preempt"])
def test_an_unreadable_pod_is_logged_without_a_traceback(
    target: Target, verb: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Prioritize and preempt logged a traceback at ERROR for every ordinary unreadable pod; preempt also passed
    the victims through, evicting pods for a pod that fits nowhere."""
    pod = requests(pod_with(), {"nvidia.com/gpu": "1", "gpu-extender.io/gpu-milli": "500"})
    body = {"Pod": pod, "NodeNames": NAMES} if verb == "prioritize" else {"Pod": pod, "NodeNameToMetaVictims": VICTIMS}
    with caplog.at_level(logging.INFO):
        status, answer = post(target, verb, body)
    assert status == 200
    assert answer == ({"NodeNameToMetaVictims": {}} if verb == "preempt" else [{"Host": n, "Score": 0} for n in NAMES])
    unreadable = [r for r in caplog.records if "unreadable pod" in r.getMessage()]
    assert unreadable and all(r.levelno == logging.INFO and not r.exc_info for r in unreadable)


def test_a_huge_value_is_not_echoed_back(target: Target) -> None:
    """An error text quotes what it refused: a megabyte of it, repeated once per node, made a filter answer of
    megabytes."""
    pod = pod_with()
    pod["metadata"]["annotations"] = {"gpu-extender.io/latency-class": "x" * 1_000_000}
    status, answer = post(target, "filter", {"Pod": pod, "NodeNames": NAMES})
    assert status == 200 and all(len(r) <= 500 for r in answer["FailedAndUnresolvableNodes"].values())
    assert "is not one of" in answer["FailedAndUnresolvableNodes"]["gpu-a"]


def test_deep_and_huge_bodies_and_odd_content_types(target: Target) -> None:
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        case = Case("filter", encode(SEEDS["filter"][0]), content_type, "shipped")
        assert check(target, case)[0] == 200
    status, answer = post(target, "filter", deep(100_000).text.encode())
    assert status == 400 and "not valid JSON" in answer["Error"]
    huge = {"Pod": SEEDS["filter"][0]["Pod"], "NodeNames": [f"n{i}" for i in range(50_000)]}
    status, answer = post(target, "filter", huge)
    assert status == 200 and answer["NodeNames"] == [] and len(answer["FailedAndUnresolvableNodes"]) == 50_000
