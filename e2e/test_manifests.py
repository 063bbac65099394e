"""What `kubectl apply -k manifests/base` would install is accepted by a real kube-apiserver, and works.

The manifests are rendered by the real kustomize (built once from the Go module proxy), sent as server-side
dry-run creates with strict field validation (unknown or misspelt fields are errors, not warnings), the rendered
scheduler configuration is run by the real kube-scheduler, and the RBAC is applied for real to check, with
SubjectAccessReviews, that each service account may do what its component does and no more than it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml

from e2e import helpers
from e2e.controlplane import ControlPlane
from policies.config import parse_policy
from scheduler.kubeapi import ApiError, read_json

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "manifests" / "base"
OVERLAYS = REPO / "manifests" / "overlays"
NAMESPACE = "gpu-extender-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    objects = helpers.kustomize_build(BASE)
    by_key = {_key(o): o for o in objects}
    assert len(by_key) == len(objects), "two rendered objects share a kind and name"
    return by_key


class Discovery:
    """kind -> (collection path prefix, resource, namespaced), from the API server's own discovery."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self._cache: dict[str, dict[str, tuple[str, bool]]] = {}

    def path(self, obj: dict[str, Any]) -> str:
        api_version = obj["apiVersion"]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if api_version not in self._cache:
            resources = read_json(self.api, "GET", base)["resources"]
            self._cache[api_version] = {
                r["kind"]: (r["name"], r["namespaced"]) for r in resources if "/" not in r["name"]
            }
        resource, namespaced = self._cache[api_version][obj["kind"]]
        if namespaced:
            namespace = obj["metadata"].get("namespace")
            assert namespace, f"{_key(obj)} is namespaced but has no namespace"
            return f"{base}/namespaces/{namespace}/{resource}"
        return f"{base}/{resource}"


def _create(api: Any, discovery: Discovery, obj: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    query = [("fieldValidation", "Strict")] + ([("dryRun", "All")] if dry_run else [])
    return dict(read_json(api, "POST", discovery.path(obj), body=obj, query=query))


@pytest.fixture(scope="module")
def namespace(api_client: kubernetes.client.ApiClient) -> str:
    """The install namespace, created for real (dry-run objects inside it need it to exist)."""
    helpers.create_namespace(api_client, NAMESPACE)
    return NAMESPACE


def test_base_renders_what_the_files_say(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    kinds = sorted({kind for kind, _ in rendered})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "PodDisruptionBudget",
        "PriorityClass",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    # kube-scheduler reads its authentication config from kube-system: this binding must stay there.
    assert rendered["RoleBinding", "gpu-scheduler-auth-reader"]["metadata"]["namespace"] == "kube-system"
    for (kind, name), obj in rendered.items():
        cluster_scoped = ("Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass")
        if kind not in cluster_scoped and name != "gpu-scheduler-auth-reader":
            assert obj["metadata"].get("namespace") == NAMESPACE, (kind, name)

    # The generated ConfigMaps carry the shipped files verbatim, under stable names (reloaded in place).
    scheduler_cm = rendered["ConfigMap", "gpu-scheduler-config"]["data"]
    assert scheduler_cm == {"kube-scheduler-config.yaml": (BASE / "kube-scheduler-config.yaml").read_text()}
    policy_cm = rendered["ConfigMap", "gpu-extender-policy"]["data"]
    assert policy_cm == {"policy.yaml": (BASE / "policy.yaml").read_text()}
    parse_policy(policy_cm["policy.yaml"], "policy ConfigMap")

    # Each Deployment reads its file where its ConfigMap is mounted.
    extender = rendered["Deployment", "gpu-extender"]["spec"]["template"]["spec"]
    args = extender["containers"][0]["args"]
    mount = extender["containers"][0]["volumeMounts"][0]["mountPath"]
    assert args[args.index("--policy") + 1] == f"{mount}/policy.yaml"
    assert extender["volumes"][0]["configMap"]["name"] == "gpu-extender-policy"
    _check_leader_election(rendered)
    sched = rendered["Deployment", "gpu-scheduler"]["spec"]["template"]["spec"]
    mount = sched["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f"--config={mount}/kube-scheduler-config.yaml" in sched["containers"][0]["command"]
    assert sched["volumes"][0]["configMap"]["name"] == "gpu-scheduler-config"
    for workload in ("gpu-extender", "gpu-scheduler"):
        account = rendered["Deployment", workload]["spec"]["template"]["spec"]["serviceAccountName"]
        assert ("ServiceAccount", account) in rendered
    assert ("ServiceAccount", "gpu-node-agent") in rendered

    # The scheduler profile reaches the extender through its Service, and sends it every pod of the profile.
    config = yaml.safe_load(scheduler_cm["kube-scheduler-config.yaml"])
    (extender_cfg,) = config["extenders"]
    service = rendered["Service", "gpu-extender"]
    port = service["spec"]["ports"][0]["port"]
    assert extender_cfg["urlPrefix"] == f"http://gpu-extender.{NAMESPACE}.svc:{port}"
    assert "managedResources" not in extender_cfg
    assert config["leaderElection"]["resourceNamespace"] == NAMESPACE


def _check_leader_election(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Two replicas elect a leader on the Lease their Role names; the Service selects the leader's label; the
    budget keeps one replica through voluntary disruptions, which a readiness shared by both replicas allows."""
    from scheduler.leader import LEADER_LABEL

    deployment = rendered["Deployment", "gpu-extender"]["spec"]
    pod = deployment["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert deployment["replicas"] == 2 and "--leader-elect" in args
    lease = args[args.index("--leader-elect-name") + 1]
    assert args[args.index("--leader-elect-pod") + 1] == "$(POD_NAMESPACE)/$(POD_NAME)"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    rules = rendered["Role", "gpu-extender-leader"]["rules"]
    assert any(lease in r.get("resourceNames", []) and "update" in r["verbs"] for r in rules)
    selector = rendered["Service", "gpu-extender"]["spec"]["selector"]
    assert selector == {**pod["metadata"]["labels"], LEADER_LABEL: "true"}
    budget = rendered["PodDisruptionBudget", "gpu-extender"]["spec"]
    assert budget["minAvailable"] == 1
    assert budget["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]


def test_overlays_render() -> None:
    for overlay in sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()):
        objects = helpers.kustomize_build(overlay)
        assert any(o["kind"] == "Deployment" for o in objects), overlay


def test_every_manifest_passes_server_side_dry_run(
    api_client: kubernetes.client.ApiClient, rendered: dict[tuple[str, str], dict[str, Any]], namespace: str
) -> None:
    discovery = Discovery(api_client)
    failures = []
    for key, obj in rendered.items():
        if key == ("Namespace", namespace):
            continue  # created for real by the fixture
        try:
            created = _create(api_client, discovery, obj, dry_run=True)
        except ApiError as exc:
            failures.append(f"{key}: HTTP {exc.status}: {exc.message}")
            continue
        assert created["metadata"]["name"] == obj["metadata"]["name"]
    assert not failures, "\n".join(failures)
    # Dry run: nothing was stored.
    with pytest.raises(ApiError) as missing:
        read_json(api_client, "GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/gpu-extender")
    assert missing.value.status == 404


def test_rendered_scheduler_config_runs_in_kube_scheduler(
    control_plane: ControlPlane, rendered: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """The ConfigMap's text as kube-scheduler loads it; only leader election is left out (one scheduler here)."""
    config = yaml.safe_load(rendered["ConfigMap", "gpu-scheduler-config"]["data"]["kube-scheduler-config.yaml"])
    config.pop("leaderElection")
    handle = control_plane.start_scheduler(yaml.safe_dump(config), name="manifest-check")
    control_plane.stop_scheduler(handle)


@pytest.fixture(scope="module")
def rbac(
    api_client: kubernetes.client.ApiClient, rendered: dict[tuple[str, str], dict[str, Any]], namespace: str
) -> Iterator[None]:
    """The rendered service accounts, roles and bindings, applied for real (and removed afterwards)."""
    discovery = Discovery(api_client)
    created = []
    for key, obj in rendered.items():
        if key[0] in RBAC_KINDS:
            try:
                _create(api_client, discovery, obj, dry_run=False)
            except ApiError as exc:
                if exc.status != 409:
                    raise
            created.append(obj)
    yield
    for obj in reversed(created):
        path = f"{discovery.path(obj)}/{obj['metadata']['name']}"
        try:
            read_json(api_client, "DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise


def _allowed(api: Any, account: str, verb: str, resource: str, namespace: str = "", name: str = "") -> bool:
    """Whether the service account may: ``resource`` is ``[group:]resource[/subresource]``."""
    group, _, resource = resource.rpartition(":")
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "resource": resource, "group": group, "namespace": namespace, "name": name}
    if subresource:
        attributes["subresource"] = subresource
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{NAMESPACE}:{account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
            "resourceAttributes": attributes,
        },
    }
    answer = read_json(api, "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review)
    return bool(answer["status"].get("allowed"))


@pytest.mark.usefixtures("rbac")
def test_service_accounts_may_do_their_job_and_little_else(api_client: kubernetes.client.ApiClient) -> None:
    api = api_client
    needed = [
        # The extender: list and watch nodes and pods, annotate a pod, bind it.
        ("gpu-extender", "list", "nodes", ""),
        ("gpu-extender", "watch", "pods", ""),
        ("gpu-extender", "patch", "pods", "team-a"),
        ("gpu-extender", "create", "pods/binding", "team-a"),
        # ... and publish the co-location plan.
        ("gpu-extender", "update", "configmaps", NAMESPACE, "gpu-extender-plan"),
        ("gpu-extender", "create", "configmaps", NAMESPACE),
        # ... and pre-warm: the replica floor of serving Deployments, or their autoscaler's minimum.
        ("gpu-extender", "patch", "apps:deployments", "team-a"),
        ("gpu-extender", "patch", "autoscaling:horizontalpodautoscalers", "team-a"),
        # ... and lead: its Lease, and the label on its own pod that the Service selects.
        ("gpu-extender", "create", "coordination.k8s.io:leases", NAMESPACE),
        ("gpu-extender", "get", "coordination.k8s.io:leases", NAMESPACE, "gpu-extender"),
        ("gpu-extender", "update", "coordination.k8s.io:leases", NAMESPACE, "gpu-extender"),
        ("gpu-extender", "list", "pods", NAMESPACE),
        ("gpu-extender", "patch", "pods", NAMESPACE),
        # The second scheduler: what kube-scheduler does, plus its lease and the authentication config.
        ("gpu-scheduler", "list", "nodes", ""),
        ("gpu-scheduler", "create", "pods/binding", "team-a"),
        ("gpu-scheduler", "create", "coordination.k8s.io:leases", NAMESPACE),
        ("gpu-scheduler", "get", "configmaps", "kube-system", "extension-apiserver-authentication"),
        # The node agent: annotate its node.
        ("gpu-node-agent", "patch", "nodes", ""),
    ]
    refused = [check for check in needed if not _allowed(api, *check)]
    assert not refused, f"denied: {refused}"
    excessive = [
        ("gpu-extender", "delete", "pods", "team-a"),
        ("gpu-extender", "get", "secrets", NAMESPACE),
        ("gpu-extender", "update", "nodes", ""),
        ("gpu-extender", "delete", "apps:deployments", "team-a"),
        ("gpu-extender", "update", "configmaps", NAMESPACE, "gpu-extender-policy"),
        ("gpu-extender", "update", "configmaps", "team-a", "gpu-extender-plan"),
        # Another component's Lease (the second scheduler's), a Lease elsewhere, or deleting its own.
        ("gpu-extender", "update", "coordination.k8s.io:leases", NAMESPACE, "gpu-scheduler"),
        ("gpu-extender", "update", "coordination.k8s.io:leases", "kube-system", "gpu-extender"),
        ("gpu-extender", "delete", "coordination.k8s.io:leases", NAMESPACE, "gpu-extender"),
        ("gpu-extender", "get", "coordination.k8s.io:leases", "team-a", "gpu-extender"),
        ("gpu-node-agent", "list", "pods", ""),
        ("gpu-node-agent", "get", "secrets", NAMESPACE),
    ]
    granted = [check for check in excessive if _allowed(api, *check)]
    assert not granted, f"granted beyond need: {granted}"
