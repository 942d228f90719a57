"""The Kubernetes manifests (deploy/kubernetes), checked without a cluster.

* Every overlay is rendered with ``kubectl kustomize`` (kubectl's built-in kustomize; the test fails,
  saying how to install it, when kubectl is missing) and every rendered document is validated
  offline with ``kubernetes-validate`` against the Kubernetes API schemas, strictly (unknown fields
  are errors), for the oldest version the manifests claim and for the newest the package knows.
* The properties that matter: probe paths and ports, the GPU limit (gpu and hub overlays only),
  non-root read-only containers with requests and limits, the HPA's metric being the gauge the
  service exports, the PDBs' selectors, the ``LIFT_*`` settings being real :class:`Settings`
  fields with valid values, the bundle's path from the export Job to the api, references between
  objects, and the router's routing block being docker/nginx.conf's apart from its server lines.
* ``nginx -t`` on the router's nginx.conf as rendered into its ConfigMap (nginx unpacked by
  docker/ci-check.sh, as for tests/test_deploy.py).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu", "hub")
GPU_OVERLAYS = ("gpu", "hub")
# The oldest Kubernetes the manifests are written for (autoscaling/v2, policy/v1,
# unhealthyPodEvictionPolicy), and the newest whose schemas the installed package has.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NAMESPACE = "lift-serve"
KUBECTL_HELP = (
    "kubectl is not installed, and these tests render the manifests with its built-in kustomize "
    "(kubectl >= 1.27). Install it: https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ , "
    "e.g. curl -LO https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl && "
    "sudo install -m 0755 kubectl /usr/local/bin/kubectl"
)


# --- rendering and lookups ---------------------------------------------------------------------


@functools.cache
def _rendered_text(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(KUBECTL_HELP)
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return done.stdout


def render(overlay: str) -> list[dict]:
    """The overlay's documents (a fresh copy each call, so a test may change them)."""
    return [doc for doc in yaml.safe_load_all(_rendered_text(overlay)) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    """The document of ``kind`` called ``name``; generated ConfigMaps carry a hash suffix."""
    found = [d for d in docs if d["kind"] == kind
             and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"no {kind} named {name}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}]


def api(docs: list[dict]) -> tuple[dict, dict]:
    """The api Deployment and its `api` container."""
    deployment = find(docs, "Deployment", "lift-api")
    (container,) = [c for c in pod_spec(deployment)["containers"] if c["name"] == "api"]
    return deployment, container


def env_entries(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def settings_data(docs: list[dict]) -> dict[str, str]:
    return find(docs, "ConfigMap", "lift-settings")["data"]


def effective_lift_env(docs: list[dict], container: dict) -> dict[str, str | None]:
    """LIFT_* as the container sees them: envFrom ConfigMaps, then env (None: from a Secret)."""
    values: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        cm = by_name(docs, "ConfigMap", source["configMapRef"]["name"])
        values.update(cm["data"])
    for name, entry in env_entries(container).items():
        values[name] = entry.get("value")
    return {k: v for k, v in values.items() if k.startswith("LIFT_")}


def cpu_cores(quantity) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volumes(spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def image_ref(image: str) -> tuple[str, str]:
    """(repository, tag) of ``registry/path/name:tag``."""
    repository, sep, tag = image.rpartition(":")
    assert sep and "/" not in tag, f"{image}: no tag; images are referenced by tag"
    return repository, tag


# --- rendering and schema validation -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_document_validates_strictly(overlay):
    docs = render(overlay)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Namespace",
                "PodDisruptionBudget", "PodDisruptionBudget", "Service", "Service"]
    if overlay != "hub":
        expected += ["ConfigMap", "Job", "PersistentVolumeClaim", "PersistentVolumeClaim"]
    assert kinds(docs) == sorted(expected)
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"overlays/{overlay}: {doc['kind']} {doc['metadata']['name']} is not valid "
                            f"Kubernetes {version}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    labels = by_name(docs, "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_strict_validation_rejects_an_unknown_field():
    """The validation above really is strict: a misspelt field is an error, not ignored."""
    deployment, _ = api(render("gpu"))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_objects_resolve(overlay):
    """Every ConfigMap, key and PVC a pod names is rendered; Secrets are the user's, so optional."""
    docs = render(overlay)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                by_name(docs, "ConfigMap", volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            assert set(volume) - {"name"} <= {"configMap", "persistentVolumeClaim", "emptyDir"}, volume
        for container in all_containers(spec):
            names = set(volumes(spec))
            assert {m["name"] for m in container.get("volumeMounts", [])} <= names
            for source in container.get("envFrom", []):
                by_name(docs, "ConfigMap", source["configMapRef"]["name"])
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = by_name(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
                    assert ref["configMapKeyRef"]["key"] in cm["data"]
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["optional"] is True, f"{entry['name']}: the Secret is not shipped"
    for doc in docs:
        if doc["kind"] == "Secret":
            pytest.fail("no Secret is shipped: API keys and tokens are created by the user")


# --- the api pods ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_probes_port_and_listen_address(overlay):
    from lift_serve.service.auth import OPEN_PATHS

    docs = render(overlay)
    deployment, container = api(docs)
    env = effective_lift_env(docs, container)
    (port,) = container["ports"]
    assert port["name"] == "http" and port["protocol"] == "TCP"
    assert port["containerPort"] == int(env["LIFT_PORT"]) == 8000
    assert env["LIFT_HOST"] == "0.0.0.0"
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, "http"), probe
        assert path in OPEN_PATHS, f"{path} would need an API key once LIFT_API_KEYS is set"
    startup = container["startupProbe"]
    # Loading and warming may take minutes (docker-compose.yml allows 180 s before counting).
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    # The headless Service the router resolves: the api pods' named port, no virtual IP.
    service = by_name(docs, "Service", "lift-api")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    assert (service_port["name"], service_port["targetPort"], service_port["port"]) == ("http", "http", 8000)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_limit_in_the_gpu_overlays_only(overlay):
    docs = render(overlay)
    _, container = api(docs)
    env = effective_lift_env(docs, container)
    repository, _ = image_ref(container["image"])
    others = [c for w in workloads(docs) for c in all_containers(pod_spec(w)) if c is not container]
    for other in others:
        assert "nvidia.com/gpu" not in {**other["resources"].get("limits", {}), **other["resources"]["requests"]}
    if overlay in GPU_OVERLAYS:
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert repository.endswith("/lift-serve-api")
        assert env["LIFT_PROVIDERS"].split(",")[0] == "cuda" and env["LIFT_REQUIRE_PROVIDER"] == "cuda"
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert "nvidia.com/gpu" not in container["resources"]["requests"]
        assert "tolerations" not in pod_spec(api(docs)[0])
        assert repository.endswith("/lift-serve-api-cpu")
        assert env["LIFT_PROVIDERS"] == "cpu"


def dockerfile_uid() -> int:
    return int(re.search(r"^ARG LIFT_UID=(\d+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M).group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_with_requests_and_limits(overlay):
    docs = render(overlay)
    for workload in workloads(docs):
        spec = pod_spec(workload)
        where = f"{workload['kind']} {workload['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in all_containers(spec):
            what = f"{where}, container {container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc["capabilities"] == {"drop": ["ALL"]}, what
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, what
            assert "privileged" not in sc, what
            if container["image"].rpartition(":")[0].split("/")[-1].startswith("lift-serve-"):
                assert sc["runAsUser"] == sc["runAsGroup"] == dockerfile_uid(), what  # the images' user
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{what}: {kind}"
            # The root filesystem is read-only: wherever the program writes is an emptyDir.
            if container["name"] != "wait-for-bundle":
                assert "emptyDir" in volumes(spec)[mounts(container)["/tmp"]["name"]], what


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_lift_settings_are_real_settings_with_valid_values(overlay):
    from lift_serve.hub.refs import is_hub_ref
    from lift_serve.service.settings import Settings

    docs = render(overlay)
    _, container = api(docs)
    data = settings_data(docs)
    assert all(key.startswith("LIFT_") for key in data), "lift-settings holds LIFT_* settings only"
    env = effective_lift_env(docs, container)
    for name in env:
        assert name[len("LIFT_"):].lower() in Settings.model_fields, f"{name} is not a setting of the service"
    literal = {name[len("LIFT_"):].lower(): value for name, value in env.items()
               if value is not None and name != "LIFT_BUNDLE"}
    Settings(**literal)  # every value is one the service accepts (raises otherwise)
    bundle = env["LIFT_BUNDLE"]
    assert is_hub_ref(bundle) if overlay == "hub" else bundle.startswith("/bundles/")
    threads = int(env["LIFT_INTRA_OP_THREADS"])
    assert 0 < threads <= cpu_cores(container["resources"]["limits"]["cpu"]), \
        "ONNX Runtime's threads should match the pod's CPU limit, not the node's cores"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_fits_in_the_grace_period(overlay):
    from lift_serve.service.settings import Settings

    docs = render(overlay)
    deployment, container = api(docs)
    env = effective_lift_env(docs, container)
    graceful = float(env.get("LIFT_GRACEFUL_SHUTDOWN_S", Settings.model_fields["graceful_shutdown_s"].default))
    (pre_stop,) = [int(arg) for arg in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > pre_stop + graceful


def compose_default(name: str, file: str) -> str:
    """The default of ``NAME: ${NAME:-default}`` in a compose file."""
    return re.search(rf"^\s*{name}: \$\{{{name}:-([^}}]+)\}}", (ROOT / file).read_text(), re.M).group(1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_bundle_goes_from_the_export_job_to_the_api_read_only(overlay):
    from lift_serve.hub.models import REGISTRY

    docs = render(overlay)
    deployment, container = api(docs)
    spec = pod_spec(deployment)
    if overlay == "hub":
        assert not any(d["kind"] in {"Job", "PersistentVolumeClaim"} for d in docs)
        assert "initContainers" not in spec and "LIFT_BUNDLE" not in env_entries(container)
        home = env_entries(container)["HF_HOME"]["value"]
        parent = max((p for p in mounts(container) if home.startswith(p + "/")), key=len)
        assert "emptyDir" in volumes(spec)[mounts(container)[parent]["name"]], "the Hub cache must be writable"
        return
    job = find(docs, "Job", "lift-export")
    job_spec = pod_spec(job)
    (export,) = job_spec["containers"]
    assert job_spec["restartPolicy"] == "Never"
    assert image_ref(export["image"])[0].endswith("/lift-serve-export")
    args = export["args"]
    assert export["command"] == ["lift", "export"]
    assert args[args.index("--model") + 1] == "$(EXPORT_MODEL)"
    out = args[args.index("--out") + 1]
    assert out == "/bundles/$(EXPORT_MODEL)" == env_entries(container)["LIFT_BUNDLE"]["value"]
    # One source for the model's name: the Job's and the api's EXPORT_MODEL are the same key.
    refs = [env_entries(c)["EXPORT_MODEL"]["valueFrom"]["configMapKeyRef"] for c in (export, container)]
    assert refs[0] == refs[1]
    export_cm = by_name(docs, "ConfigMap", refs[0]["name"])["data"]
    model = REGISTRY[export_cm["EXPORT_MODEL"]]
    assert model.checkpoint, "the default model must need no checkpoint file (its weights are on the Hub)"
    # The precision docker-compose uses for the same job.
    compose = "docker-compose.yml" if overlay == "gpu" else "docker-compose.cpu.yml"
    assert export_cm["EXPORT_PRECISION"] == compose_default("EXPORT_PRECISION", compose)
    # Written by the Job, read-only in the api, the same claim; the api waits for its manifest.
    assert not mounts(export)["/bundles"].get("readOnly", False)
    job_claim = volumes(job_spec)[mounts(export)["/bundles"]["name"]]["persistentVolumeClaim"]
    api_claim = volumes(spec)[mounts(container)["/bundles"]["name"]]["persistentVolumeClaim"]
    assert mounts(container)["/bundles"]["readOnly"] is True and api_claim["readOnly"] is True
    assert job_claim["claimName"] == api_claim["claimName"] == "lift-bundles"
    claim = by_name(docs, "PersistentVolumeClaim", "lift-bundles")
    if claim["spec"]["accessModes"] == ["ReadWriteOnce"]:
        # One node at a time: the Job must run beside an api pod, or each waits for the other.
        (term,) = job_spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        api_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert term["labelSelector"]["matchLabels"].items() <= api_labels.items()
    (wait,) = spec["initContainers"]
    assert wait["command"][-1] == "$(LIFT_BUNDLE)" and "manifest.json" in wait["command"][2]
    assert env_entries(wait)["LIFT_BUNDLE"] == env_entries(container)["LIFT_BUNDLE"]
    assert mounts(wait)["/bundles"]["readOnly"] is True
    # The weights' cache survives the Job, where the export image looks for it.
    hf_home = re.search(r"HF_HOME=(\S+)", (ROOT / "docker" / "Dockerfile").read_text()).group(1)
    assert env_entries(export)["HF_HOME"]["value"] == hf_home
    assert volumes(job_spec)[mounts(export)[hf_home]["name"]]["persistentVolumeClaim"]["claimName"] == "lift-hf-cache"


# --- scaling and disruptions -------------------------------------------------------------------


def exported_gauges() -> set[str]:
    from lift_serve.service.metrics import ServiceMetrics

    return {family.name for family in ServiceMetrics().registry.collect() if family.type == "gauge"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_api_on_the_queue_gauge_or_on_cpu(overlay):
    docs = render(overlay)
    hpa = by_name(docs, "HorizontalPodAutoscaler", "lift-api")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "lift-api")
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    if overlay in GPU_OVERLAYS:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name == "lift_queue_depth" and name in exported_gauges(), "the HPA must use a gauge /metrics serves"
        average = float(metric["pods"]["target"]["averageValue"])
        env = settings_data(docs)
        assert 1 <= average < int(env["LIFT_MAX_QUEUE"]), "scale before the queue is full (429)"
        # prometheus-adapter's rule serves exactly this name from exactly this series.
        values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
        (rule,) = values["rules"]["custom"]
        assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    else:
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"
        assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
        assert "cpu" in api(docs)[1]["resources"]["requests"]  # utilisation is relative to it


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_select_their_pods(overlay):
    docs = render(overlay)
    for name in ("lift-api", "lift-router"):
        pdb = by_name(docs, "PodDisruptionBudget", name)
        selector = pdb["spec"]["selector"]["matchLabels"]
        selected = [w["metadata"]["name"] for w in workloads(docs)
                    if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [name]
        # Never blocks a drain for good, even with a single replica (see api-pdb.yaml).
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


# --- the router --------------------------------------------------------------------------------

SERVER_LINE = re.compile(r"^\s*server\s+(\S+)\s+(.*);\s*$")


def routing_block(text: str) -> list[str]:
    start = text.index("# BEGIN lift routing")
    end = text.index("# END lift routing", start)
    return text[start:end].splitlines()


def router_conf(docs: list[dict]) -> str:
    router = find(docs, "Deployment", "lift-router")
    spec = pod_spec(router)
    (nginx,) = spec["containers"]
    mount = mounts(nginx)["/etc/nginx/nginx.conf"]
    cm = by_name(docs, "ConfigMap", volumes(spec)[mount["name"]]["configMap"]["name"])
    return cm["data"][mount["subPath"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_routes_like_docker_nginx_conf_over_the_headless_service(overlay):
    docs = render(overlay)
    text = router_conf(docs)
    ours, theirs = routing_block(text), routing_block((ROOT / "docker" / "nginx.conf").read_text())
    assert [line for line in ours if not SERVER_LINE.match(line)] == \
           [line for line in theirs if not SERVER_LINE.match(line)], \
        "the routing block must be docker/nginx.conf's, apart from the upstream server lines"
    assert "hash $lift_route consistent;" in text and "least_conn;" in text
    # One server per upstream: the headless Service's SRV record for the api's named port, each
    # ready pod under its own name (so each has its own place on the hash ring), re-resolved.
    service = by_name(docs, "Service", "lift-api")
    (port,) = service["spec"]["ports"]
    address = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    docker_params = {SERVER_LINE.match(line).group(2).replace("resolve ", "") for line in theirs
                     if SERVER_LINE.match(line)}
    # A fixed weight (not the SRV records' 100/N), so the ring does not reshuffle when N changes.
    ours_prefix = f"service={port['name']} resolve weight=10 "
    upstreams = re.findall(r"upstream (\w+) \{(.*?)\}", "\n".join(ours), re.S)
    assert [name for name, _ in upstreams] == ["lift_by_route", "lift_by_load"]
    for _, body in upstreams:
        (server,) = [SERVER_LINE.match(line).groups() for line in body.splitlines() if SERVER_LINE.match(line)]
        host, params = server
        assert host == address
        assert params.startswith(ours_prefix)
        assert {params.removeprefix(ours_prefix)} == docker_params
    assert re.search(r"^\s*resolver kube-dns\.kube-system\.svc\.cluster\.local valid=\d+s", text, re.M)
    # The router's image can run this configuration: `resolve` / `service=` need nginx >= 1.27.3.
    router = find(docs, "Deployment", "lift-router")
    (nginx,) = pod_spec(router)["containers"]
    repository, tag = image_ref(nginx["image"])
    assert repository == "nginxinc/nginx-unprivileged"
    version = tuple(int(p) for p in re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-alpine", tag).groups())
    assert version >= (1, 27, 3)
    # Ports: nginx listens where the container and the Service say.
    (listen,) = re.findall(r"^\s*listen (\d+);", text, re.M)
    (container_port,) = nginx["ports"]
    assert int(listen) == container_port["containerPort"] == 8080 and container_port["name"] == "http"
    router_service = by_name(docs, "Service", "lift-router")
    assert router_service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in router_service["spec"]["ports"]] == [(8080, "http")]
    for probe in ("readinessProbe", "livenessProbe"):
        assert nginx[probe]["httpGet"] == {"path": "/lb-health", "port": "http"}
    # A read-only root: nginx's pid and temporary files are under /tmp, an emptyDir.
    assert "pid /tmp/nginx.pid;" in text
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert re.search(rf"^\s*{kind}_temp_path /tmp/", text, re.M), kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_tagged_and_share_one_registry(overlay):
    docs = render(overlay)
    images = {c["image"] for w in workloads(docs) for c in all_containers(pod_spec(w))}
    ours = {image_ref(i) for i in images if "lift-serve-" in i}
    assert all(tag and tag != "latest" for _, tag in ours)
    assert len({(repo.rpartition("/")[0], tag) for repo, tag in ours}) == 1, \
        f"the lift-serve images should come from one registry with one tag: {sorted(images)}"


def test_router_config_passes_nginx_t(tmp_path):
    nginx = shutil.which("nginx") or str(ROOT / ".cache/ci/nginx/usr/sbin/nginx")
    if not os.access(nginx, os.X_OK):
        pytest.skip("no nginx binary (docker/ci-check.sh unpacks Debian's into .cache/ci/nginx)")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    text = router_conf(render("gpu"))
    # As tests/test_deploy.py: Debian 12's nginx (1.22) predates `resolve` and `service=` in
    # open-source upstreams (1.27.3; the router runs 1.28), and outside a cluster neither the
    # Service's name nor kube-dns resolve: only those are adapted, and the files nginx writes go to
    # tmp_path instead of /tmp. The rest of the configuration is checked as it is.
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if match and tuple(int(p) for p in match.groups()) < (1, 27, 3):
        text = text.replace(" resolve ", " ")
    text = re.sub(r"server \S+\.svc\.cluster\.local service=\S+", "server 127.0.0.1:8000", text)
    text = re.sub(r"resolver \S+", "resolver 127.0.0.1", text)
    text = text.replace(" /tmp/", f" {tmp_path}/")
    (tmp_path / "nginx.conf").write_text(text)
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "/dev/stderr"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
