"""Fuzzing the extender's verbs with malformed and odd requests, seeded from real kube-scheduler traffic.

    python -m e2e.fuzz_verbs --cases 10000     # (`make fuzz`) prints cases per verb and the status codes seen

Each case starts from a body kube-scheduler really sent (`../shared/wire/`) and bends it: absurd quantities
(400-digit numbers, negative, NaN-like text), wrong types in any field, unknown, duplicated and numeric node names,
`"metadata": null`, init containers and pod-level resources, MIG profiles that do not exist, values nested ~1,000
levels deep, huge bodies, missing or wrong content types. Every answer must hold the properties of `check`: no 5xx,
no hang, a 200 that parses as the protocol's answer to that verb, any other status a 400 with a short `Error` text,
and no traceback or ERROR in the log. Bodies kube-scheduler would never send still arrive through proxies, version
skew or an attacker; a crash on one closes the scheduler's keep-alive connection and loses the next call too.

`tests/test_fuzz_verbs.py` runs the same strategies and checks, bounded, in CI.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from extender.app import MAX_ERROR_CHARS, create_app
from extender.metrics import ExtenderMetrics
from extender.wire import ExtenderFilterResult, ExtenderPreemptionArgs, ExtenderPreemptionResult
from policies.config import PlacementPolicy, load_policy
from policies.inventory import GpuDevice, NodeInventory
from scheduler.binder import MemoryBinder
from scheduler.datasets import shared_data
from scheduler.model import ClusterModel
from scheduler.nodes import load_fleet
from scheduler.service import PlacementService

REPO = Path(__file__).resolve().parents[1]
WIRE = shared_data().parent / "wire"
FLEET = REPO / "tests" / "data" / "wire-fleet.yaml"
SHIPPED_POLICY = REPO / "manifests" / "base" / "policy.yaml"

VERBS = ("filter", "prioritize", "bind", "preempt", "explain")
HANG_S = 10.0  # twice kube-scheduler's default extender httpTimeout
MIG_NODE = "mig-h100"


# -- the seeds ---------------------------------------------------------------------------------------------------
def _captured(name: str) -> dict[str, Any]:
    return json.loads((WIRE / f"{name}.request.json").read_text())


def seeds() -> dict[str, list[dict[str, Any]]]:
    """The captured request bodies of each verb (explain takes filter's arguments)."""
    filters = [_captured("filter-001"), _captured("filter-002"), _captured("filter-nocache-001")]
    return {
        "filter": filters,
        "prioritize": [_captured("prioritize-001")],
        "bind": [_captured("bind-p3-001")],
        "preempt": [_captured("preempt-p3-001")],
        "explain": filters,
    }


SEEDS = seeds()
SEED_PODS = [SEEDS["filter"][0]["Pod"], SEEDS["filter"][1]["Pod"], SEEDS["preempt"][0]["Pod"]]
KNOWN_NODES = ("gpu-a", "gpu-b", "gpu-c", "gpu-p", MIG_NODE)
KNOWN_UIDS = (*(p["metadata"]["uid"] for p in SEED_PODS), "01a12396-9a4a-4bc6-b342-e3e375d65e44")


# -- raw JSON text that orjson cannot produce (400-digit numbers, nesting beyond its limit, NaN) -------------------
@dataclass(frozen=True)
class Raw:
    """A value written into the body as this exact JSON text (or not-quite-JSON text)."""

    text: str


def encode(document: Any) -> bytes:
    """`document` as JSON, each `Raw` written as its text."""
    raws: list[str] = []

    def token(value: Any) -> str:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@raw{len(raws) - 1}@@"
        raise TypeError(type(value).__name__)

    body = orjson.dumps(document, default=token, option=orjson.OPT_PASSTHROUGH_DATACLASS)
    for i, text in enumerate(raws):
        body = body.replace(f'"@@raw{i}@@"'.encode(), text.encode(), 1)
    return body


def deep(levels: int, leaf: str = '"1"', kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * levels + leaf + "]" * levels)
    return Raw('{"a":' * levels + leaf + "}" * levels)


# -- strategies --------------------------------------------------------------------------------------------------
ODD_QUANTITIES = (
    "9" * 400,
    "-" + "9" * 400,
    "0." + "0" * 400 + "1",
    "9" * 400 + "Ei",
    "9" * 30,
    "1e18",
    "1e30",
    "1e31",
    "1e999999999",
    "1e-999999999",
    "9223372036854775807",
    "9223372036854775808",
    "-1",
    "-0",
    "-500m",
    "NaN",
    "nan",
    "Infinity",
    "-Inf",
    "1_000",
    " 1",
    "1 ",
    "0x10",
    "1e3Mi",
    "",
    "1.5.5",
    ".5",
    "5.",
    "+1",
    "1Ki",
    "8Ei",
    "m",
    "Mi",
    "１",
    "½",
    "1\x00",
    "0",
    "1",
    "2",
    "4",
    "8",
    "16",
    "100m",
    "500",
    "999",
    "1000",
    "1500",
    "2000",
    "0.5",
    "64Mi",
    "20Gi",
)
RESOURCE_NAMES = (
    "cpu",
    "memory",
    "nvidia.com/gpu",
    "gpu-extender.io/gpu-milli",
    "nvidia.com/mig-1g.10gb",
    "nvidia.com/mig-3g.40gb",
    "nvidia.com/mig-7g.80gb",
    "nvidia.com/mig-9g.999gb",
    "nvidia.com/mig-",
    "nvidia.com/mig-1g.10gb+me",
    "nvidia.com/mig-1g.5gb",
    "ephemeral-storage",
    "example.com/thing",
)
ODD_NAMES = ("ghost", "", "5", "0", "-1", "gpu-a ", "GPU-A", "gpu-a\x00", "ü", "x" * 300, "null")
ANNOTATION_KEYS = (
    "gpu-extender.io/gpu-memory",
    "gpu-extender.io/gpu-types",
    "gpu-extender.io/latency-class",
    "gpu-extender.io/expected-busy",
    "gpu-extender.io/model",
)
ODD_TEXT = (
    "",
    "20Gi",
    "1",
    "0.5",
    "-1",
    "NaN",
    "2",
    "A100|H100",
    "|",
    "interactive",
    "BATCH",
    "T4",
    "9" * 400,
    "x" * 5000,
)
CONTENT_TYPES = (
    "application/json",
    "application/json",
    None,
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/json; charset=latin-1",
    "multipart/form-data; boundary=x",
    "garbage/!!",
)


def fresh(value: Any) -> st.SearchStrategy[Any]:
    """A new copy of a list or object at every draw: mutations bend drawn values in place, and a shared one would
    change what later draws return."""
    return st.builds(copy.deepcopy, st.just(value))


@functools.cache
def _raw_numbers() -> st.SearchStrategy[Raw]:
    return st.sampled_from(
        [Raw("9" * 400), Raw("-" + "9" * 400), Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("1e-400")]
    )


@functools.cache
def big_integers() -> st.SearchStrategy[Any]:
    """Integers of any size; those beyond 64 bits (which orjson will not write) as raw text."""
    return st.integers(-(2**70), 2**70).map(lambda i: i if -(2**63) <= i < 2**64 else Raw(str(i)))


@functools.cache
def deep_values() -> st.SearchStrategy[Raw]:
    """Values nested up to past the JSON parser's depth limit (1,024), in lists or objects."""
    leaf = st.sampled_from(['"1"', "1", "null", "{}", '"x"'])
    return st.builds(deep, st.sampled_from([50, 250, 1000, 1030]), leaf, st.sampled_from(["list", "dict"]))


@functools.cache
def scalars() -> st.SearchStrategy[Any]:
    """Every JSON scalar, with numbers no JSON encoder writes and text that looks like a quantity."""
    return st.one_of(
        st.none(),
        st.booleans(),
        big_integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(ODD_QUANTITIES),
        _raw_numbers(),
    )


@functools.cache
def odd_values() -> st.SearchStrategy[Any]:
    """Anything a field could be given instead of what it expects."""
    nested = st.recursive(
        scalars(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=6,
    )
    return st.one_of(scalars(), nested, deep_values(), fresh({}), fresh([]))


@functools.cache
def quantities() -> st.SearchStrategy[Any]:
    """What a resource quantity could be: odd text more often than not, and every wrong type."""
    return st.one_of(
        st.sampled_from(ODD_QUANTITIES),
        st.sampled_from(ODD_QUANTITIES),
        big_integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        _raw_numbers(),
        deep_values(),
        st.none(),
        st.booleans(),
        st.lists(st.sampled_from(ODD_QUANTITIES), max_size=2),
        st.text(max_size=8),
    )


@functools.cache
def resource_lists() -> st.SearchStrategy[Any]:
    """A ResourceList of real, unknown and non-existent MIG resource names, or no map at all."""
    return st.one_of(
        st.dictionaries(st.sampled_from(RESOURCE_NAMES), quantities(), max_size=4),
        st.sampled_from([None, 5, "1"]),
        fresh([]),
        fresh([{"nvidia.com/gpu": "1"}]),
    )


@functools.cache
def node_names() -> st.SearchStrategy[str]:
    """The fleet's names, names it does not have, names that are numbers in text, and any text."""
    return st.one_of(st.sampled_from(KNOWN_NODES), st.sampled_from(ODD_NAMES), st.text(max_size=10))


@functools.cache
def name_lists() -> st.SearchStrategy[Any]:
    """`NodeNames`: short, duplicated, null, 20,000 long, or holding numbers and nulls."""
    return st.one_of(
        st.lists(node_names(), max_size=8),
        st.lists(st.sampled_from(KNOWN_NODES), min_size=2, max_size=10),  # duplicates
        st.just(None),
        fresh([f"node-{i}" for i in range(20_000)] + list(KNOWN_NODES)),  # a huge list
        st.lists(st.one_of(node_names(), big_integers(), st.none()), min_size=1, max_size=4),
    )


@functools.cache
def node_items() -> st.SearchStrategy[Any]:
    """`Nodes` (nodeCacheCapable: false): items with numeric, null or missing names, `"metadata": null`."""
    item = st.one_of(
        st.builds(lambda n: {"metadata": {"name": n}}, node_names()),
        st.builds(
            lambda n: {"metadata": {"name": n}}, st.one_of(big_integers(), st.none(), st.lists(st.text(), max_size=2))
        ),
        fresh({"metadata": None}),
        fresh({}),
        st.just(None),
        st.just(5),
    )
    return st.one_of(
        st.builds(lambda items: {"items": items}, st.lists(item, max_size=6)),
        fresh({"items": None}),
        fresh({"items": 3}),
    )


@functools.cache
def metadata() -> st.SearchStrategy[Any]:
    """A pod's metadata, null or of a wrong type, or with identity fields of any type."""
    ids = st.one_of(st.text(max_size=8), st.sampled_from(KNOWN_UIDS), odd_values())
    return st.one_of(
        st.just(None),
        st.just(2),
        st.just("pod"),
        fresh([]),
        st.fixed_dictionaries({}, optional={"name": ids, "namespace": ids, "uid": ids, "annotations": odd_values()}),
    )


@functools.cache
def annotations() -> st.SearchStrategy[Any]:
    """The extender's annotations with odd values and wrong types."""
    value = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=10), odd_values())
    return st.one_of(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), value, max_size=4), odd_values())


@functools.cache
def selectors() -> st.SearchStrategy[dict[str, Any]]:
    """nodeSelector and required node affinity on the GPU product, of right and wrong shapes."""
    label = "nvidia.com/gpu.product"
    value = st.one_of(st.sampled_from(["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3", "T4", ""]), odd_values())
    expression = st.one_of(
        st.fixed_dictionaries(
            {
                "key": st.just(label),
                "operator": st.sampled_from(["In", "NotIn", 5]),
                "values": st.one_of(st.lists(value, max_size=3), odd_values()),
            }
        ),
        odd_values(),
    )
    term = st.one_of(
        st.fixed_dictionaries({"matchExpressions": st.one_of(st.lists(expression, max_size=3), odd_values())}),
        odd_values(),
    )
    terms = st.one_of(st.lists(term, max_size=3), odd_values())
    affinity = st.builds(
        lambda t: {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": t}}}, terms
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "nodeSelector": st.one_of(st.dictionaries(st.just(label), value, max_size=1), odd_values()),
            "affinity": st.one_of(affinity, odd_values()),
        },
    )


@functools.cache
def containers() -> st.SearchStrategy[Any]:
    """Containers (or init containers, some restartable) with odd resources."""
    one = st.fixed_dictionaries(
        {"name": st.just("c")},
        optional={
            "resources": st.one_of(
                st.fixed_dictionaries({}, optional={"requests": resource_lists(), "limits": resource_lists()}),
                odd_values(),
            ),
            "restartPolicy": st.sampled_from(["Always", "OnFailure", 5, None]),
        },
    )
    return st.one_of(st.lists(st.one_of(one, odd_values()), max_size=3), odd_values())


@functools.cache
def meta_victims() -> st.SearchStrategy[dict[str, Any]]:
    """`NodeNameToMetaVictims` (nodeCacheCapable): victims by UID, known or not, and odd values."""
    uid = st.one_of(st.sampled_from(KNOWN_UIDS), st.text(max_size=6))
    victims = st.lists(st.one_of(st.builds(lambda u: {"UID": u}, uid), odd_values()), max_size=4)
    pdb = st.one_of(st.integers(-5, 5), st.just(2**63), _raw_numbers())
    meta = st.fixed_dictionaries({"Pods": st.one_of(victims, st.none()), "NumPDBViolations": pdb})
    return st.dictionaries(node_names(), meta, max_size=4)


@functools.cache
def full_victims() -> st.SearchStrategy[dict[str, Any]]:
    """`NodeNameToVictims`: whole victim pods, `"metadata": null` among them."""
    pods = st.lists(st.one_of(st.builds(lambda m: {"metadata": m}, metadata()), odd_values()), max_size=3)
    full = st.fixed_dictionaries({"Pods": st.one_of(pods, st.none()), "NumPDBViolations": st.integers(0, 3)})
    return st.dictionaries(node_names(), full, max_size=3)


# -- mutations of a seed ------------------------------------------------------------------------------------------
def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a document a value sits (keys of objects, indexes of lists)."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for i, value in enumerate(document[:8]):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        document = document[step]
    return document


@st.composite
def mutated_pod(draw: st.DrawFn, pod: dict[str, Any]) -> dict[str, Any]:
    """A seed pod with its GPU request, annotations, selectors, init containers or identity bent."""
    pod = copy.deepcopy(pod)
    spec = pod.setdefault("spec", {})
    for change in draw(
        st.lists(
            st.sampled_from(
                ["requests", "init", "pod-level", "overhead", "annotations", "selectors", "metadata", "containers"]
            ),
            max_size=3,
        )
    ):
        first = spec["containers"][0] if isinstance(spec.get("containers"), list) and spec["containers"] else None
        if change == "requests" and isinstance(first, dict):
            first["resources"] = {"requests": draw(resource_lists()), "limits": draw(resource_lists())}
        elif change == "init":
            spec["initContainers"] = draw(containers())
        elif change == "pod-level":
            spec["resources"] = draw(
                st.one_of(
                    st.fixed_dictionaries({}, optional={"requests": resource_lists(), "limits": resource_lists()}),
                    odd_values(),
                )
            )
        elif change == "overhead":
            spec["overhead"] = draw(resource_lists())
        elif change == "annotations" and isinstance(pod.get("metadata"), dict):
            pod["metadata"]["annotations"] = draw(annotations())
        elif change == "selectors":
            spec.update(draw(selectors()))
        elif change == "metadata":
            pod["metadata"] = draw(metadata())
        elif change == "containers":
            spec["containers"] = draw(containers())
    return pod


@st.composite
def bent(draw: st.DrawFn, document: Any) -> Any:
    """Set, delete or add a value anywhere in the document."""
    paths = list(_paths(document))
    if not paths:
        return document
    path = draw(st.sampled_from(paths))
    parent = _parent(document, path)
    action = draw(st.sampled_from(["set", "set", "delete", "add"]))
    if action == "set" or (isinstance(parent, list) and action == "delete"):
        parent[path[-1]] = draw(odd_values())
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(odd_values())
    return document


@st.composite
def documents(draw: st.DrawFn, verb: str) -> Any:
    """A seed body of `verb`, bent by the mutations that matter for it, then maybe anywhere."""
    body = copy.deepcopy(draw(st.sampled_from(SEEDS[verb])))
    if "Pod" in body and draw(st.booleans()):
        body["Pod"] = draw(mutated_pod(draw(st.sampled_from([body["Pod"], *SEED_PODS]))))
    if verb in ("filter", "prioritize", "explain"):
        form = draw(st.sampled_from(["keep", "names", "items", "none"]))
        if form == "names":
            body["Nodes"], body["NodeNames"] = None, draw(name_lists())
        elif form == "items":
            body["Nodes"], body["NodeNames"] = draw(node_items()), None
        elif form == "none":
            body.pop("NodeNames", None)
    elif verb == "bind":
        if draw(st.booleans()):
            body["Node"] = draw(node_names())
        if draw(st.booleans()):
            pod = draw(st.sampled_from(SEED_PODS))["metadata"]
            body.update(PodName=pod["name"], PodUID=pod["uid"])
        if draw(st.booleans()):
            body["PodUID"] = draw(st.one_of(st.text(max_size=8), st.sampled_from(KNOWN_UIDS)))
    elif verb == "preempt":
        form = draw(st.sampled_from(["keep", "meta", "full"]))
        if form == "meta":
            body["NodeNameToMetaVictims"] = draw(meta_victims())
        elif form == "full":
            body["NodeNameToMetaVictims"] = None
            body["NodeNameToVictims"] = draw(full_victims())
    body = copy.deepcopy(body)  # nothing drawn above may be bent in place
    for _ in range(draw(st.integers(0, 2))):
        body = draw(bent(body))
    return body


@dataclass(frozen=True)
class Case:
    verb: str
    body: bytes
    content_type: str | None
    policy: str  # which service answers: "builtin" or "shipped"

    def __repr__(self) -> str:  # hypothesis prints a failing case: keep it readable
        shown = self.body if len(self.body) < 2000 else self.body[:2000] + b"..."
        return f"Case({self.verb!r}, policy={self.policy!r}, content_type={self.content_type!r}, body={shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


GARBAGE = (b"", b"{", b"null", b"[]", b"[1, 2]", b'"x"', b"1", b"\xff\xfe\x00", b"{}", b'{"Pod": null}', b"NaN")


@st.composite
def cases(draw: st.DrawFn, verb: str | None = None) -> Case:
    """One request: mostly a bent seed, sometimes garbage or a body of megabytes, under some content type."""
    verb = verb or draw(st.sampled_from(VERBS))
    kind = draw(st.integers(0, 19))
    if kind == 0:
        body = draw(
            st.one_of(
                st.sampled_from(GARBAGE), st.binary(max_size=40), st.builds(lambda r: r.text.encode(), deep_values())
            )
        )
    elif kind == 1:  # a huge body: megabytes in one annotation
        document = copy.deepcopy(SEEDS["filter"][0] if verb != "bind" else SEEDS["bind"][0])
        document["padding"] = "x" * 4_000_000
        if "Pod" in document:
            document["Pod"]["metadata"]["annotations"] = {"gpu-extender.io/gpu-memory": "9" * 1_000_000}
        body = encode(document)
    else:
        body = encode(draw(documents(verb)))
    return Case(verb, body, draw(st.sampled_from(CONTENT_TYPES)), draw(st.sampled_from(["builtin", "shipped"])))


# -- the service under test --------------------------------------------------------------------------------------
def fleet() -> list[NodeInventory]:
    """The captured traffic's nodes, and an H100 in MIG mode."""
    mig = tuple(GpuDevice(i, "NVIDIA-H100-80GB-HBM3", 81_920, mig_table="H100-80GB") for i in range(2))
    return [*load_fleet(str(FLEET)), NodeInventory(MIG_NODE, 64_000, 262_144, mig)]


def service(policy: PlacementPolicy) -> PlacementService:
    model = ClusterModel(policy)
    model.replace_nodes(fleet())
    model.mark_ready()
    binder = MemoryBinder()
    for pod in SEED_PODS:
        binder.add_pod(copy.deepcopy(pod))  # a bind of a pod the extender has not seen reads it from here
    return PlacementService(model, binder, confirm_on_bind=True)


class LogTrap(logging.Handler):
    """Log records a bad request must never cause: ERROR and above, or any record with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.caught: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.caught.append(record)


class Target:
    """The extender app in this process (the same ASGI app `serve` runs), one per policy, with a watchdog."""

    def __init__(self) -> None:
        from fastapi.testclient import TestClient

        policies = {"builtin": PlacementPolicy(), "shipped": load_policy(SHIPPED_POLICY)}
        self.clients = {}
        for name, policy in policies.items():
            placement = service(policy)
            app = create_app(placement, ExtenderMetrics(placement.model))
            client = TestClient(app, raise_server_exceptions=False)
            client.__enter__()  # one event loop for every request (without it, each request starts its own)
            self.clients[name] = client
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fuzz")
        self.trap = LogTrap()

    def close(self) -> None:
        for client in self.clients.values():
            client.__exit__(None, None, None)
        self._pool.shutdown(wait=False)

    @contextmanager
    def trapping(self) -> Iterator[LogTrap]:
        root = logging.getLogger()
        level = root.level
        root.addHandler(self.trap)
        root.setLevel(logging.INFO)
        try:
            yield self.trap
        finally:
            root.removeHandler(self.trap)
            root.setLevel(level)

    def send(self, case: Case) -> tuple[int, dict[str, str], bytes, float]:
        """POST the case; a reply that takes longer than `HANG_S` is a hang."""
        headers = {"content-type": case.content_type} if case.content_type else {}
        client = self.clients[case.policy]
        start = time.perf_counter()
        future = self._pool.submit(client.post, f"/{case.verb}", content=case.body, headers=headers)
        try:
            reply = future.result(timeout=HANG_S)
        except FutureTimeout:
            raise AssertionError(f"no answer within {HANG_S} s: {case!r}") from None
        return reply.status_code, dict(reply.headers), reply.content, time.perf_counter() - start


# -- the properties ----------------------------------------------------------------------------------------------
def _sent(case: Case) -> dict[str, Any]:
    """The body as the extender read it (it answered 200, so it was a JSON object)."""
    document = orjson.loads(case.body)
    assert isinstance(document, dict), f"a 200 for a body that is not an object: {document!r:.200}"
    return document


def _input_names(sent: dict[str, Any]) -> list[str]:
    if sent.get("NodeNames") is not None:
        return list(sent["NodeNames"])
    return [item["metadata"]["name"] for item in (sent.get("Nodes") or {}).get("items") or []]


def _no_crash_text(error: str, case: Case) -> None:
    assert "internal error" not in error, f"a crash answered as a protocol error: {error!r} for {case!r}"
    assert len(error) <= MAX_ERROR_CHARS + 200, f"an error text of {len(error)} characters for {case!r}"


def _check_filter(doc: Any, case: Case) -> str:
    assert isinstance(doc, dict) and set(doc) == set(ExtenderFilterResult.model_fields), doc
    result = ExtenderFilterResult.model_validate(doc)
    assert isinstance(doc["NodeNames"], list), "NodeNames must never be null"
    names = set(_input_names(_sent(case)))
    answered = set(result.NodeNames) | set(result.FailedNodes) | set(result.FailedAndUnresolvableNodes)
    assert answered <= names, f"filter answered names it was not asked about: {answered - names}"
    both = set(result.NodeNames) & (set(result.FailedNodes) | set(result.FailedAndUnresolvableNodes))
    assert not both, f"filter both passed and failed {both}"
    _no_crash_text(result.Error, case)
    for reason in (*result.FailedNodes.values(), *result.FailedAndUnresolvableNodes.values()):
        _no_crash_text(reason, case)
    return "error" if result.Error else ("passed" if result.NodeNames else "none passed")


def _check_prioritize(doc: Any, case: Case) -> str:
    assert isinstance(doc, list), doc
    for entry in doc:
        assert isinstance(entry, dict) and set(entry) == {"Host", "Score"}, entry
        assert isinstance(entry["Host"], str) and type(entry["Score"]) is int and 0 <= entry["Score"] <= 10, entry
    assert Counter(e["Host"] for e in doc) == Counter(_input_names(_sent(case))), "one score per name asked"
    return "scored" if any(e["Score"] for e in doc) else "all zero"


def _check_bind(doc: Any, case: Case) -> str:
    assert isinstance(doc, dict) and set(doc) == {"Error"} and isinstance(doc["Error"], str), doc
    _no_crash_text(doc["Error"], case)
    return "error" if doc["Error"] else "bound"


def _candidates(sent: dict[str, Any]) -> dict[str, tuple[list[str], int]]:
    """The victims offered per node and their PDB count, read as the wire model reads them (it answered 200)."""
    args = ExtenderPreemptionArgs.model_validate(sent)
    return {node: ([p.UID for p in v.Pods or []], v.NumPDBViolations) for node, v in args.candidates().items()}


def _check_preempt(doc: Any, case: Case) -> str:
    assert isinstance(doc, dict) and set(doc) == {"NodeNameToMetaVictims"}, doc
    result = ExtenderPreemptionResult.model_validate(doc)
    asked = _candidates(_sent(case))
    for node, victims in result.NodeNameToMetaVictims.items():
        assert node in asked, f"preempt answered a node it was not offered: {node!r}"
        uids = [p.UID for p in victims.Pods or []]
        assert set(uids) <= set(asked[node][0]), f"preempt added victims on {node}: {uids} not in {asked[node][0]}"
        assert victims.NumPDBViolations == asked[node][1], f"NumPDBViolations changed on {node!r}"
    return "kept some" if result.NodeNameToMetaVictims else "kept none"


def _check_explain(doc: Any, case: Case) -> str:
    assert isinstance(doc, dict) and set(doc) == {"nodes"} and isinstance(doc["nodes"], list), doc
    sent = _sent(case)
    for entry in doc["nodes"]:
        assert isinstance(entry["node"], str) and isinstance(entry["fits"], bool), entry
        assert isinstance(entry["reason"], str) and type(entry["score"]) is int and 0 <= entry["score"] <= 10, entry
    if sent.get("NodeNames") is not None:
        answered = Counter(e["node"] for e in doc["nodes"])
        assert answered == Counter(sent["NodeNames"]), f"explain answered {answered}, asked {sent['NodeNames']}"
    return "fits somewhere" if any(e["fits"] for e in doc["nodes"]) else "fits nowhere"


CHECKS = {
    "filter": _check_filter,
    "prioritize": _check_prioritize,
    "bind": _check_bind,
    "preempt": _check_preempt,
    "explain": _check_explain,
}


def check(target: Target, case: Case) -> tuple[int, str, Any]:
    """Send one case and check every property; returns the status, what kind of answer it was, and the answer."""
    with target.trapping() as trap:
        status, headers, payload, _ = target.send(case)
    logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in trap.caught]
    trap.caught.clear()
    assert status < 500, f"HTTP {status} for {case!r}: {payload[:500]!r}"
    assert not logged, f"bad input logged a traceback or an ERROR: {logged} for {case!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = orjson.loads(payload)
    if status != 200:
        assert status == 400, f"HTTP {status} for {case!r}"
        assert isinstance(doc, dict) and set(doc) == {"Error"}, doc
        assert isinstance(doc["Error"], str) and doc["Error"].strip(), doc
        assert len(doc["Error"]) <= MAX_ERROR_CHARS + 100, f"a {len(doc['Error'])}-character error text"
        return status, "refused", doc
    return status, CHECKS[case.verb](doc, case), doc


# -- the command ---------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    answers: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def record(self, case: Case, status: int, answer: str) -> None:
        self.cases[case.verb] += 1
        self.statuses[case.verb][status] += 1
        self.answers[case.verb][answer] += 1

    def table(self) -> str:
        lines = [f"{'verb':<11} {'cases':>6}  statuses             answers"]
        for verb in VERBS:
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses[verb].items()))
            answers = ", ".join(f"{a}: {n}" for a, n in self.answers[verb].most_common())
            lines.append(f"{verb:<11} {self.cases[verb]:>6}  {statuses:<20} {answers}")
        lines.append(f"{'total':<11} {sum(self.cases.values()):>6}")
        return "\n".join(lines)


def run(cases_per_verb: int, target: Target | None = None, tally: Tally | None = None) -> Tally:
    """Fuzz each verb with `cases_per_verb` generated cases; raises AssertionError on the first property broken
    (after hypothesis has shrunk it to a small case)."""
    target = target or Target()
    tally = tally or Tally()
    for verb in VERBS:

        @settings(
            max_examples=cases_per_verb,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases(verb))
        def one(case: Case) -> None:
            status, answer, _ = check(target, case)
            tally.record(case, status, answer)

        one()
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all, spread evenly over the verbs")
    args = parser.parse_args(argv)
    start = time.monotonic()
    per_verb = -(-args.cases // len(VERBS))
    try:
        tally = run(per_verb)
    except AssertionError:
        traceback.print_exc()  # with hypothesis's note of the smallest failing case
        print("FAILED", file=sys.stderr)
        return 1
    print(tally.table())
    print(f"no 5xx, no hang, every 200 protocol-valid, no traceback logged; {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
