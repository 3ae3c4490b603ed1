#!/usr/bin/env bash
# check-deploy.sh: render and check the Kubernetes deployment files under deploy/kubernetes.
#
# For every kustomization (a directory holding kustomization.yaml) it
#   - renders it with `kubectl kustomize` (the copy is kept in target/deploy-rendered/),
#   - validates every object strictly with kubernetes-validate against Kubernetes
#     $DEPLOY_K8S_VERSIONS (custom resources it has no schema for, the PodMonitor, get a
#     shape check instead; any other unknown kind fails),
#   - checks the pod specs against the gateway's needs: restricted pod security, a read-only
#     root, the config mounted from a ConfigMap (not subPath, so hot reload works), listen and
#     admin.listen matching the named ports, probes on /healthz and /readyz of the admin port,
#     terminationGracePeriodSeconds >= shutdown_delay + timeouts.shutdown + 5s, an app
#     container's preStop sleep covering that drain (+1s) within the grace period, a Redis
#     (session.coordination.redis_url or store: redis) for more than one replica, Services and
#     NetworkPolicies that reach only the gateway's ports, the PodMonitor on admin /metrics,
#     and ingress-nginx forward-auth annotations pointing at a rendered portcullis Service,
#   - runs `$PORTCULLIS_BIN check` on the mounted portcullis.yaml, with every `*_file` it names
#     materialised from the rendered Secret/ConfigMap into a temporary directory (passed as
#     PORTCULLIS_<KEY>_FILE; the caller's own PORTCULLIS_* variables are not passed on).
#
# One PASS/FAIL line per check, then `check-deploy: N passed, M failed`; exit 1 on a failure.
#
# Needs: kubectl (if missing and running as root, Debian's kubernetes-client is installed) and
# Python 3 with kubernetes-validate (if not importable, installed with pip into
# target/deploy-venv). After that first install it runs offline.
#
# Environment: PORTCULLIS_BIN (default target/release/portcullis), KUBECTL (default kubectl),
# DEPLOY_K8S_VERSIONS (default "1.30 latest": the oldest supported and the newest known).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PORTCULLIS_BIN=${PORTCULLIS_BIN:-target/release/portcullis}
KUBECTL=${KUBECTL:-kubectl}
DEPLOY_K8S_VERSIONS=${DEPLOY_K8S_VERSIONS:-1.30 latest}
VENV=target/deploy-venv
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0

setup_failed() {
  echo "FAIL setup: $*"
  echo "check-deploy: 0 passed, 1 failed"
  exit 1
}

# ---- kubectl (with its built-in kustomize)
if ! command -v "$KUBECTL" >/dev/null 2>&1; then
  if [[ $KUBECTL == kubectl && $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "check-deploy: kubectl not found, installing Debian's kubernetes-client" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q kubernetes-client ||
      { apt-get update -q && apt-get install -y -q kubernetes-client; }; } >&2 ||
      setup_failed "could not install kubernetes-client"
  else
    setup_failed "$KUBECTL not found: install kubectl (Debian: kubernetes-client) or set KUBECTL"
  fi
fi

# ---- Python with kubernetes-validate (+ PyYAML, its dependency)
PY=
for candidate in "$VENV/bin/python" python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
    PY=$candidate
    break
  fi
done
if [[ -z $PY ]]; then
  echo "check-deploy: installing $KUBERNETES_VALIDATE into $VENV" >&2
  rm -rf "$VENV"
  { python3 -m venv "$VENV" &&
    "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBERNETES_VALIDATE"; } >&2 ||
    setup_failed "could not install $KUBERNETES_VALIDATE into $VENV (python3 -m venv, pip)"
  PY=$VENV/bin/python
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mapfile -t dirs < <(find deploy/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
[[ ${#dirs[@]} -gt 0 ]] || setup_failed "no kustomization.yaml under deploy/kubernetes"

cat >"$tmp/check_deploy.py" <<'PY'
"""Render each kustomization, validate what it renders, and check the gateway's config in it.

One line per check (PASS/FAIL), then `check-deploy: N passed, M failed`; exit 1 on a failure.
"""
import argparse
import base64
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from urllib.parse import urlsplit, parse_qs

import yaml
from kubernetes_validate import utils as kv

passed = 0
failed = 0


def report(what, problems):
    """One check: `problems` is a list of strings, empty when it passed."""
    global passed, failed
    if problems:
        failed += 1
        print(f"FAIL {what}")
        for p in problems:
            for line in str(p).splitlines():
                print(f"       {line}")
    else:
        passed += 1
        print(f"PASS {what}")
    sys.stdout.flush()


# ---------------------------------------------------------------- helpers


def ns_of(obj):
    return (obj.get("metadata") or {}).get("namespace") or ""


def name_of(obj):
    return (obj.get("metadata") or {}).get("name") or "?"


def ref(obj):
    ns = ns_of(obj)
    return f"{obj.get('kind')}/{name_of(obj)}" + (f" (ns {ns})" if ns else "")


def find(objs, kind, ns, name):
    for o in objs:
        if o.get("kind") == kind and ns_of(o) == ns and name_of(o) == name:
            return o
    return None


def duration_seconds(text, default):
    """humantime-style durations as the gateway writes them: 5s, 1m 30s, 500ms, 2h."""
    if text is None or text == "":
        return default
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
             "h": 3600, "hr": 3600, "hrs": 3600, "d": 86400, "days": 86400, "day": 86400}
    total, pos = 0.0, 0
    s = str(text).strip()
    for m in re.finditer(r"\s*(\d+)\s*([a-z]+)", s):
        if m.start() != pos or m.group(2) not in units:
            raise ValueError(f"cannot read duration {text!r}")
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"cannot read duration {text!r}")
    return total


def split_hostport(addr):
    host, _, port = str(addr).rpartition(":")
    return host.strip("[]"), int(port)


def is_portcullis(container):
    last = container.get("image", "").split("@")[0].rsplit("/", 1)[-1]  # drop digest, registry
    return last.split(":")[0] == "portcullis" or container.get("name") == "portcullis"


def selects(selector, labels):
    """A label selector (matchLabels/matchExpressions, or a plain map) against labels."""
    if not selector:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        for k, v in (selector.get("matchLabels") or {}).items():
            if labels.get(k) != v:
                return False
        for e in selector.get("matchExpressions") or []:
            k, op, vals = e["key"], e["operator"], e.get("values") or []
            if op == "In" and labels.get(k) not in vals:
                return False
            if op == "NotIn" and labels.get(k) in vals:
                return False
            if op == "Exists" and k not in labels:
                return False
            if op == "DoesNotExist" and k in labels:
                return False
        return True
    return all(labels.get(k) == v for k, v in selector.items())


class Pod:
    """A pod template of a workload, with its portcullis container if it has one."""

    def __init__(self, owner):
        self.owner = owner
        self.ns = ns_of(owner)
        tpl = owner["spec"]["template"]
        self.labels = (tpl.get("metadata") or {}).get("labels") or {}
        self.spec = tpl["spec"]
        self.containers = self.spec.get("containers") or []
        self.gw = next((c for c in self.containers if is_portcullis(c)), None)

    def port(self, container, port):
        """A containerPort of `container` by name or number, or None."""
        for p in container.get("ports") or []:
            if port == p.get("name") or port == p.get("containerPort"):
                return p
        return None

    def owner_of_port(self, port):
        for c in self.containers:
            p = self.port(c, port)
            if p:
                return c, p
        return None, None


def workloads(objs):
    return [Pod(o) for o in objs
            if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")]


def object_data(obj):
    """A ConfigMap's or Secret's keys and their text."""
    out = {}
    for k, v in (obj.get("data") or {}).items():
        out[k] = base64.b64decode(v).decode() if obj.get("kind") == "Secret" else v
    for k, v in (obj.get("stringData") or {}).items():
        out[k] = v
    return out


def resolve_file(objs, pod, container, path):
    """Which ConfigMap/Secret key is the file `path` inside `container`? -> (text, where) or error."""
    best = None
    for m in container.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    if best is None:
        raise LookupError(f"{path} is on no volume mount of container {container['name']}")
    mp = best["mountPath"].rstrip("/")
    rel = path[len(mp) + 1:] if path != mp else ""
    if best.get("subPath"):
        rel = best["subPath"] + ("/" + rel if rel else "")
    vol = next((v for v in pod.spec.get("volumes") or [] if v["name"] == best["name"]), None)
    if vol is None:
        raise LookupError(f"volume {best['name']} is not defined")
    sources = []
    if "configMap" in vol:
        sources.append(("ConfigMap", vol["configMap"]))
    if "secret" in vol:
        s = dict(vol["secret"])
        s["name"] = s.get("secretName")
        sources.append(("Secret", s))
    for s in (vol.get("projected") or {}).get("sources") or []:
        if "configMap" in s:
            sources.append(("ConfigMap", s["configMap"]))
        if "secret" in s:
            sources.append(("Secret", s["secret"]))
    if not sources:
        raise LookupError(f"volume {best['name']} is neither a ConfigMap, a Secret nor projected from them")
    for kind, src in sources:
        obj = find(objs, kind, pod.ns, src.get("name"))
        key = None
        if src.get("items"):
            key = next((i["key"] for i in src["items"] if i["path"] == rel), None)
        elif obj is not None and rel in object_data(obj):
            key = rel
        if key is None:
            continue
        where = f"{kind} {src.get('name')} key {key}"
        if obj is None:
            raise LookupError(f"{path} comes from {where}, which this kustomization does not render")
        data = object_data(obj)
        if key not in data:
            raise LookupError(f"{path}: {where} does not exist")
        return data[key], where, best
    raise LookupError(f"{path}: no key of volume {best['name']} is mounted there")


def config_path(container):
    # As the binary reads it: `--config` wins over PORTCULLIS_CONFIG, which the image sets.
    argv = (container.get("command") or []) + (container.get("args") or [])
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    for e in container.get("env") or []:
        if e.get("name") == "PORTCULLIS_CONFIG" and "value" in e:
            return e["value"]
    return "/etc/portcullis/portcullis.yaml"  # the image's PORTCULLIS_CONFIG


def file_keys(cfg, path=()):
    """Every `*_file` key with a value: [(('provider','client_secret_file'), '/etc/...')]."""
    out = []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if isinstance(v, dict):
                out += file_keys(v, path + (k,))
            elif str(k).endswith("_file") and v:
                out.append((path + (k,), str(v)))
    return out


# ---------------------------------------------------------------- checks

POD_MONITOR_SPEC = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                    "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit",
                    "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
                    "keepDroppedTargets", "scrapeProtocols", "scrapeClass", "bodySizeLimit",
                    "fallbackScrapeProtocol", "selectorMechanism"}
POD_MONITOR_ENDPOINT = {"port", "portNumber", "targetPort", "path", "scheme", "params",
                        "interval", "scrapeTimeout", "honorLabels", "honorTimestamps",
                        "trackTimestampsStaleness", "relabelings", "metricRelabelings",
                        "followRedirects", "enableHttp2", "filterRunning", "proxyUrl",
                        "tlsConfig", "basicAuth", "bearerTokenSecret", "authorization",
                        "oauth2", "noProxy", "proxyFromEnvironment", "proxyConnectHeader"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def podmonitor_shape(obj):
    p = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1":
        p.append(f"apiVersion {obj.get('apiVersion')!r}, expected monitoring.coreos.com/v1")
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        p.append(f"unexpected top-level keys {sorted(extra)}")
    spec = obj.get("spec") or {}
    extra = set(spec) - POD_MONITOR_SPEC
    if extra:
        p.append(f"spec: unexpected keys {sorted(extra)}")
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        p.append("spec.selector must have matchLabels or matchExpressions")
    eps = spec.get("podMetricsEndpoints")
    if not isinstance(eps, list) or not eps:
        p.append("spec.podMetricsEndpoints must be a non-empty list")
    for i, ep in enumerate(eps or []):
        extra = set(ep) - POD_MONITOR_ENDPOINT
        if extra:
            p.append(f"spec.podMetricsEndpoints[{i}]: unexpected keys {sorted(extra)}")
        if not isinstance(ep.get("port"), str):
            p.append(f"spec.podMetricsEndpoints[{i}].port must be a port name")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            p.append(f"spec.podMetricsEndpoints[{i}].path must start with /")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                p.append(f"spec.podMetricsEndpoints[{i}].{k}: {ep[k]!r} is not a duration")
    return p


SHAPES = {"PodMonitor": podmonitor_shape}


def check_schema(label, obj, versions):
    vs = ", ".join(versions)
    what = f"schema   {label}: {ref(obj)} (Kubernetes {vs}, strict)"
    problems = []
    try:
        for v in versions:
            try:
                kv.validate(obj, v, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(x) for x in e.path)
                problems.append(f"{v}: {path}: {e.message}")
    except (kv.SchemaNotFoundError, KeyError) as e:
        if isinstance(e, KeyError):
            report(what, [f"not a Kubernetes object: {e} missing"])
            return
        shape = SHAPES.get(obj.get("kind"))
        if shape is None:
            problems = [f"no schema for {obj.get('apiVersion')} {obj.get('kind')} and no shape check"]
        else:
            what = f"shape    {label}: {ref(obj)} (custom resource; not in Kubernetes' schemas)"
            problems = shape(obj)
    except Exception as e:  # a schema that does not resolve, ...: report, do not crash
        problems.append(f"{type(e).__name__}: {e}")
    report(what, problems)


def check_pod_security(label, pod):
    p = []
    spec, psc = pod.spec, pod.spec.get("securityContext") or {}
    if spec.get("automountServiceAccountToken") is not False:
        p.append("automountServiceAccountToken should be false (the gateway needs no API access)")
    if spec.get("enableServiceLinks") is not False:
        p.append("enableServiceLinks should be false (Service links inject PORTCULLIS_* variables)")
    for c in pod.containers:
        sc = c.get("securityContext") or {}
        n = c["name"]
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            p.append(f"{n}: runAsNonRoot is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            p.append(f"{n}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            p.append(f"{n}: privileged")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            p.append(f"{n}: capabilities.drop does not include ALL")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            p.append(f"{n}: seccompProfile is not RuntimeDefault")
    gw = pod.gw
    sc = gw.get("securityContext") or {}
    if sc.get("readOnlyRootFilesystem") is not True:
        p.append("portcullis: readOnlyRootFilesystem is not true")
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    if uid != 65532:
        p.append(f"portcullis: runAsUser is {uid!r}, expected 65532 (the image's user)")
    res = gw.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                p.append(f"portcullis: resources.{kind}.{r} missing")
    report(f"security {label}: {ref(pod.owner)} (restricted pod security, read-only gateway)", p)


def check_gateway_config(label, objs, pod):
    """The gateway's config as mounted, against the pod spec around it. Returns (text, cfg)."""
    gw, p = pod.gw, []
    path = config_path(gw)
    try:
        text, where, mount = resolve_file(objs, pod, gw, path)
    except LookupError as e:
        report(f"config   {label}: {ref(pod.owner)}", [str(e)])
        return None, None
    if mount.get("subPath"):
        p.append(f"{path} is mounted with subPath: ConfigMap updates (hot reload) never reach it")
    if not mount.get("readOnly"):
        p.append(f"volume mount {mount['mountPath']} is not readOnly")
    try:
        cfg = yaml.safe_load(text) or {}
        if not isinstance(cfg, dict):
            raise yaml.YAMLError("the top level is not a mapping")
    except yaml.YAMLError as e:
        report(f"config   {label}: {ref(pod.owner)} ({where})", [f"invalid YAML: {e}"])
        return None, None

    def port_named(name):
        pp = pod.port(gw, name)
        return pp and pp.get("containerPort")

    try:
        host, port = split_hostport(cfg.get("listen", "127.0.0.1:4180"))
        if ipaddress.ip_address(host) not in (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")):
            p.append(f"listen {cfg.get('listen')!r}: must be 0.0.0.0 to be reachable in the pod")
        if port != port_named("http"):
            p.append(f"listen port {port} is not the container port named http ({port_named('http')})")
    except ValueError as e:
        p.append(f"listen: {e}")
    admin = (cfg.get("admin") or {}).get("listen")
    if not admin:
        p.append("admin.listen is not set (probes and PodMonitor use the admin port)")
    else:
        try:
            host, port = split_hostport(admin)
            if ipaddress.ip_address(host) not in (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")):
                p.append(f"admin.listen {admin!r}: must be 0.0.0.0 for the kubelet's probes")
            if port != port_named("admin"):
                p.append(f"admin.listen port {port} is not the container port named admin ({port_named('admin')})")
        except ValueError as e:
            p.append(f"admin.listen: {e}")
    for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (gw.get(probe) or {}).get("httpGet") or {}
        if hg.get("path") != want:
            p.append(f"{probe}: httpGet path {hg.get('path')!r}, expected {want}")
        if hg.get("port") not in ("admin", port_named("admin")):
            p.append(f"{probe}: port {hg.get('port')!r} is not the admin port")
    if ((cfg.get("log") or {}).get("format")) != "json":
        p.append("log.format should be json")
    if (cfg.get("provider") or {}).get("client_secret") or (cfg.get("cookie") or {}).get("secrets"):
        p.append("inline secrets in the ConfigMap: use provider.client_secret_file / cookie.secrets_file")
    if (cfg.get("cookie") or {}).get("secure") is False:
        p.append("cookie.secure is false")
    replicas = (pod.owner.get("spec") or {}).get("replicas", 1)
    session = cfg.get("session") or {}
    redis = session.get("store") == "redis" or (session.get("coordination") or {}).get("redis_url")
    if replicas > 1 and not redis:
        p.append(f"{replicas} replicas and no Redis (session.coordination.redis_url): they "
                 "would refresh one session at once, and a rotating refresh token ends the grant")
    if not str(cfg.get("redirect_url", "")).startswith("https://"):
        p.append("redirect_url is not https")
    try:
        delay = duration_seconds((cfg.get("lifecycle") or {}).get("shutdown_delay"), 5)
        drain = duration_seconds((cfg.get("timeouts") or {}).get("shutdown"), 25)
        grace = pod.spec.get("terminationGracePeriodSeconds", 30)
        if grace < delay + drain + 5:
            p.append(f"terminationGracePeriodSeconds {grace} < shutdown_delay {delay:g}s + "
                     f"timeouts.shutdown {drain:g}s + 5s margin")
        # An app that waits in preStop (so that what the gateway still forwards finds it)
        # must wait out the gateway's whole drain (+1s: the gateway lets just-accepted
        # connections send their request before draining), and still stop within the grace.
        for c in pod.containers:
            if c is gw:
                continue
            sleep = ((((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {})
                     .get("seconds"))
            if sleep is None:
                continue
            if sleep < delay + drain + 1:
                p.append(f"container {c.get('name')}: preStop sleep {sleep}s < shutdown_delay "
                         f"{delay:g}s + timeouts.shutdown {drain:g}s + 1s: the app would stop "
                         f"while the gateway still drains requests to it")
            if sleep >= grace:
                p.append(f"container {c.get('name')}: preStop sleep {sleep}s is not under "
                         f"terminationGracePeriodSeconds {grace}")
    except ValueError as e:
        p.append(str(e))
    up = urlsplit(str(cfg.get("upstream", "")))
    if up.hostname in ("127.0.0.1", "localhost", "::1"):
        port = up.port or (443 if up.scheme == "https" else 80)
        c, _ = pod.owner_of_port(port)
        if c is None or c is gw:
            p.append(f"upstream {cfg.get('upstream')} is on loopback but no other container declares port {port}")
    report(f"config   {label}: {ref(pod.owner)} ({where} matches the pod: ports, probes, grace period)", p)
    return text, cfg


def check_portcullis(label, objs, pod, text, cfg, binary, tmp):
    what = (f"gateway  {label}: {ref(pod.owner)}: portcullis check accepts the mounted config"
            " (and refuses the Secret's placeholder key)")
    binary = os.path.abspath(binary) if os.sep in binary else (shutil.which(binary) or binary)
    if not os.access(binary, os.X_OK):
        report(what, [f"{binary} not found or not executable: build it (make build) or set PORTCULLIS_BIN"])
        return
    d = os.path.join(tmp, label.replace("/", "_") + "-" + name_of(pod.owner))
    os.makedirs(d, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTCULLIS_")}
    for e in pod.gw.get("env") or []:
        if "value" in e and e["name"] != "PORTCULLIS_CONFIG":
            env[e["name"]] = e["value"]
    p = []
    # The shipped Secret holds the published example key as a placeholder: the gateway must
    # refuse it (it listens beyond loopback), and take the config once it is replaced.
    placeholder = "UkVQTEFDRXhXSVRIeFBPUlRDVUxMSVN4U0VDUkVUeHg="
    as_shipped = {}
    for i, (keypath, path) in enumerate(file_keys(cfg)):
        try:
            content, _, _ = resolve_file(objs, pod, pod.gw, path)
        except LookupError as e:
            p.append(f"{'.'.join(keypath)}: {e}")
            continue
        local = os.path.join(d, f"file{i}")
        if placeholder in content:
            as_shipped[local] = content
            fresh = subprocess.run([binary, "secret"], stdout=subprocess.PIPE, text=True,
                                   timeout=60).stdout.strip()
            content = content.replace(placeholder, fresh)
        with open(local, "w") as f:
            f.write(content)
        env["PORTCULLIS_" + "_".join(keypath).upper()] = local
    cfgfile = os.path.join(d, "portcullis.yaml")
    with open(cfgfile, "w") as f:
        f.write(text)
    def run_check():
        return subprocess.run([binary, "check", "--config", cfgfile], env=env, cwd=d,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=60)
    if not p:
        try:
            r = run_check()
            if r.returncode != 0:
                p.append(f"exit {r.returncode}: " + r.stdout.strip())
            for local, content in as_shipped.items():
                with open(local, "w") as f:
                    f.write(content)
            if as_shipped:
                r = run_check()
                if r.returncode != 2 or "published" not in r.stdout:
                    p.append("the Secret's placeholder key is not refused: "
                             f"exit {r.returncode}: " + r.stdout.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            p.append(f"{binary}: {e}")
    report(what, p)


def pods_selected(pods, ns, selector):
    return [q for q in pods if q.ns == ns and selects(selector, q.labels)]


def check_service(label, svc, pods):
    p = []
    sel = (svc.get("spec") or {}).get("selector") or {}
    matched = pods_selected(pods, ns_of(svc), sel)
    if not matched:
        p.append(f"selector {sel} matches no pod template")
    for q in matched:
        for sp in svc["spec"].get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            c, cp = q.owner_of_port(target)
            if c is None:
                p.append(f"port {sp.get('port')}: targetPort {target!r} is no container port of {ref(q.owner)}")
            elif q.gw is not None and (c is not q.gw or cp.get("name") != "http"):
                p.append(f"port {sp.get('port')}: targetPort {target!r} is {c['name']}:{cp.get('containerPort')}, "
                         "not portcullis' http port: it would bypass the gateway")
    report(f"service  {label}: {ref(svc)} reaches only the gateway's http port", p)


def auth_ingresses(objs, ns=None):
    """The Ingresses that send their requests to an external auth service (forward-auth)."""
    return [o for o in objs if o.get("kind") == "Ingress"
            and AUTH + "auth-url" in ((o.get("metadata") or {}).get("annotations") or {})
            and (ns is None or ns_of(o) == ns)]


def admits_only_namespaces(spec):
    """Whether every ingress rule of a NetworkPolicy admits only pods of chosen namespaces."""
    rules = spec.get("ingress") or []
    return "Ingress" in (spec.get("policyTypes") or ["Ingress"]) and all(
        r.get("from") and all(f.get("namespaceSelector") and not f.get("ipBlock") for f in r["from"])
        for r in rules)


def check_networkpolicy(label, np, pods, objs):
    p = []
    spec = np.get("spec") or {}
    matched = pods_selected(pods, ns_of(np), spec.get("podSelector") or {})
    if not matched and auth_ingresses(objs, ns_of(np)):
        # The forward-auth example's policy for the protected app, whose pods are not ours.
        report(f"netpol   {label}: {ref(np)} admits the protected app's pods only from chosen namespaces",
               [] if admits_only_namespaces(spec) else
               ["a rule admits peers other than pods of chosen namespaces (the controller's)"])
        return
    if not matched:
        p.append("podSelector matches no pod template")
    if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
        p.append("policyTypes lacks Ingress")
    for q in matched:
        if q.gw is None:
            continue
        for i, rule in enumerate(spec.get("ingress") or []):
            if not rule.get("ports"):
                p.append(f"ingress[{i}] allows every port (the app's too)")
            for rp in rule.get("ports") or []:
                c, cp = q.owner_of_port(rp.get("port"))
                if c is not q.gw:
                    p.append(f"ingress[{i}] allows port {rp.get('port')!r}, which is not the gateway's"
                             + (f" (it is {c['name']}'s)" if c else ""))
                elif cp.get("name") == "admin" and not rule.get("from"):
                    p.append(f"ingress[{i}] opens the admin port {rp.get('port')} to everyone")
    report(f"netpol   {label}: {ref(np)} admits only the gateway's ports", p)


def check_selector_only(label, obj, pods, selector, what):
    matched = pods_selected(pods, ns_of(obj), selector or {})
    report(f"selector {label}: {ref(obj)} {what}", [] if matched else [f"selector {selector} matches no pod template"])


def check_podmonitor(label, pm, pods):
    p = []
    spec = pm.get("spec") or {}
    ns = ns_of(pm)
    nss = (spec.get("namespaceSelector") or {}).get("matchNames")
    matched = [q for q in pods if (q.ns in nss if nss else q.ns == ns) and selects(spec.get("selector") or {}, q.labels)]
    matched = [q for q in matched if q.gw is not None]
    if not matched:
        p.append("selector matches no pod template with a portcullis container")
    for q in matched:
        for ep in spec.get("podMetricsEndpoints") or []:
            cp = q.port(q.gw, ep.get("port"))
            if cp is None or cp.get("name") != "admin":
                p.append(f"port {ep.get('port')!r} is not portcullis' admin port in {ref(q.owner)}")
            if ep.get("path", "/metrics") != "/metrics":
                p.append(f"path {ep.get('path')!r}: the gateway serves /metrics")
    report(f"monitor  {label}: {ref(pm)} scrapes the admin port's /metrics", p)


AUTH = "nginx.ingress.kubernetes.io/"


def check_forward_auth(label, ing, objs, pods, configs):
    p = []
    ann = (ing.get("metadata") or {}).get("annotations") or {}
    url = urlsplit(ann[AUTH + "auth-url"])
    parts = (url.hostname or "").split(".")
    svc = None
    if url.path != "/oauth2/auth":
        p.append(f"auth-url path {url.path!r}, expected /oauth2/auth")
    if len(parts) >= 3 and parts[2] == "svc":
        svc = find(objs, "Service", parts[1], parts[0])
        if svc is None:
            p.append(f"auth-url names Service {parts[0]} in namespace {parts[1]}, which is not rendered here")
    else:
        p.append(f"auth-url host {url.hostname!r} is not <service>.<namespace>.svc[.cluster.local]")
    gw_pods = []
    if svc is not None:
        port = url.port or 80
        sp = next((x for x in svc["spec"].get("ports") or [] if x.get("port") == port), None)
        if sp is None:
            p.append(f"Service {name_of(svc)} has no port {port}")
        gw_pods = [q for q in pods_selected(pods, ns_of(svc), svc["spec"].get("selector") or {}) if q.gw]
        if not gw_pods:
            p.append(f"Service {name_of(svc)} selects no portcullis pod")
    signin = urlsplit(ann.get(AUTH + "auth-signin", ""))
    if signin.path != "/oauth2/start" or "rd" not in parse_qs(signin.query):
        p.append("auth-signin should be https://$host/oauth2/start?rd=$escaped_request_uri")
    headers = [h.strip() for h in ann.get(AUTH + "auth-response-headers", "").split(",")]
    for h in ("X-Auth-Request-User", "X-Auth-Request-Email"):
        if h not in headers:
            p.append(f"auth-response-headers lacks {h}")
    # The site nginx served, beside X-Original-URL (built from the client's Host header).
    set_headers = ann.get(AUTH + "auth-proxy-set-headers", "")
    ns, _, name = set_headers.rpartition("/")
    extra = find(objs, "ConfigMap", ns or ns_of(ing), name) if name else None
    if extra is None:
        p.append("auth-proxy-set-headers names no rendered ConfigMap: X-Original-URL carries the "
                 "client's Host, so routes' host rules need X-Forwarded-Host: $host beside it")
    elif (extra.get("data") or {}).get("X-Forwarded-Host") != "$host":
        p.append(f"ConfigMap {name_of(extra)} (auth-proxy-set-headers) does not set X-Forwarded-Host to $host")
    if not any(o.get("kind") == "NetworkPolicy" and ns_of(o) == ns_of(ing)
               and admits_only_namespaces(o.get("spec") or {}) for o in objs):
        p.append(f"no NetworkPolicy in namespace {ns_of(ing)} admits the app only from the controller: "
                 "any pod could reach it with forged X-Auth-Request-* headers")
    if str(ann.get(AUTH + "auth-always-set-cookie", "")).lower() != "true":
        p.append('auth-always-set-cookie is not "true": a session refreshed during the auth '
                 "subrequest would lose its new cookie whenever the app answers an error")
    hosts = {r.get("host") for r in (ing["spec"].get("rules") or [])}
    def reaches(path, target):
        # Whether an Ingress path (Exact, or Prefix by whole segments) takes `target`.
        want = path.get("path", "")
        if path.get("pathType") == "Exact":
            return want == target
        want = want.rstrip("/")
        return target == want or target.startswith(want + "/")

    for host in hosts:
        to_gateway = []
        for other in objs:
            if other.get("kind") != "Ingress" or svc is None or ns_of(other) != ns_of(svc):
                continue
            for r in other["spec"].get("rules") or []:
                if r.get("host") != host:
                    continue
                for path in (r.get("http") or {}).get("paths") or []:
                    b = (path.get("backend") or {}).get("service") or {}
                    if b.get("name") == name_of(svc):
                        to_gateway.append(path)
        for endpoint in ("/oauth2/start", "/oauth2/callback", "/oauth2/sign_out"):
            if svc is not None and not any(reaches(x, endpoint) for x in to_gateway):
                p.append(f"no Ingress routes https://{host}{endpoint} to Service {name_of(svc)}")
        for endpoint in ("/oauth2/auth", "/oauth2/auth/x"):
            if any(reaches(x, endpoint) for x in to_gateway):
                p.append(f"an Ingress routes https://{host}{endpoint} to Service {name_of(svc)}: the "
                         "forward-auth answer (the access token for the controller, a trusted proxy) "
                         "would reach a script on the page; list the browser's /oauth2/ endpoints one by one")
        for q in gw_pods:
            cfg = configs.get(id(q)) or {}
            rhost = urlsplit(str(cfg.get("redirect_url", ""))).hostname
            if cfg and rhost != host:
                p.append(f"redirect_url host {rhost!r} of {ref(q.owner)} is not the Ingress host {host!r}")
    report(f"fwdauth  {label}: {ref(ing)} -> portcullis /oauth2/auth, login endpoints routed (not /oauth2/auth), cookies passed, X-Forwarded-Host $host, redirect_url host, app reachable only through the controller", p)


def mebibytes(quantity):
    """A Kubernetes memory quantity (128Mi, 1Gi, 134217728, 500M) in MiB, or None."""
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|K|M|G)?", str(quantity or ""))
    if not m:
        return None
    unit = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9, None: 1}[m.group(2)]
    return float(m.group(1)) * unit / 2**20


def check_memory_budget(label, q, cfg):
    """The worst the config lets the gateway hold fits the container's memory limit: every
    connection with a request head of max_header_bytes arriving, a full session cache, and
    ~32 MiB for the rest."""
    lim = cfg.get("limits") or {}
    conns = int(lim.get("max_connections", 10000))
    head = int(lim.get("max_header_bytes", 65536))
    cache = int(lim.get("session_cache_bytes", 33554432))
    worst = (conns * head + cache) / 2**20 + 32
    limit = mebibytes(((q.gw.get("resources") or {}).get("limits") or {}).get("memory"))
    p = []
    if limit is None:
        p.append("the gateway container has no memory limit")
    elif worst > limit:
        p.append(f"limits allow ~{worst:.0f} MiB (max_connections {conns} x max_header_bytes {head} "
                 f"+ session_cache_bytes {cache} + 32 MiB), over the container's {limit:.0f} MiB limit")
    report(f"memory   {label}: {ref(q.owner)} connection and cache limits fit the memory limit", p)


def check_sidecar_token(label, q, cfg, objs):
    """A gateway in front of its app (no forward-auth Ingress asks it) whose trusted proxies
    bring browsers' requests: its /oauth2/auth answer must not carry the access token."""
    for ing in auth_ingresses(objs):
        url = urlsplit(((ing.get("metadata") or {}).get("annotations") or {})[AUTH + "auth-url"])
        parts = (url.hostname or "").split(".")
        svc = find(objs, "Service", parts[1], parts[0]) if len(parts) >= 3 else None
        if svc and q in pods_selected([q], ns_of(svc), svc["spec"].get("selector") or {}):
            return
    p = []
    if cfg.get("trusted_proxies") and (cfg.get("forward_auth") or {}).get("pass_access_token") is not False:
        p.append("trusted_proxies is set and forward_auth.pass_access_token is not false: a browser's "
                 "own /oauth2/auth request, through that proxy, would read the access token")
    report(f"token    {label}: {ref(q.owner)} keeps the access token out of /oauth2/auth answers", p)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--versions", required=True)
    ap.add_argument("dirs", nargs="+")
    a = ap.parse_args()

    latest = kv.major_minor(kv.latest_version())
    versions = [latest if v == "latest" else v for v in a.versions.split()]
    known = {kv.major_minor(v) for v in kv.all_versions()}
    missing = [v for v in versions if v not in known]
    if missing:
        report("setup    kubernetes-validate schemas", [f"no schemas for Kubernetes {missing}"])
        versions = [v for v in versions if v in known] or [latest]
    os.makedirs(a.out, exist_ok=True)

    for d in a.dirs:
        label = os.path.relpath(d, "deploy/kubernetes")
        r = subprocess.run([a.kubectl, "kustomize", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            report(f"render   {label}: kubectl kustomize {d}", [r.stderr.strip() or f"exit {r.returncode}"])
            continue
        out = os.path.join(a.out, label.replace("/", "_") + ".yaml")
        with open(out, "w") as f:
            f.write(r.stdout)
        try:
            objs = [o for o in yaml.safe_load_all(r.stdout) if o]
        except yaml.YAMLError as e:
            report(f"render   {label}: kubectl kustomize {d}", [f"output is not YAML: {e}"])
            continue
        report(f"render   {label}: kubectl kustomize {d} -> {out} ({len(objs)} objects)",
               [] if objs else ["rendered nothing"])

        for o in objs:
            check_schema(label, o, versions)

        pods = workloads(objs)
        gw_pods = [q for q in pods if q.gw is not None]
        if not gw_pods:
            report(f"gateway  {label}: a workload runs portcullis", ["no container with a portcullis image"])
        configs = {}
        for q in gw_pods:
            check_pod_security(label, q)
            text, cfg = check_gateway_config(label, objs, q)
            if text is not None:
                configs[id(q)] = cfg
                check_portcullis(label, objs, q, text, cfg, a.bin, a.tmp)
                check_sidecar_token(label, q, cfg, objs)
                check_memory_budget(label, q, cfg)
        for o in objs:
            kind = o.get("kind")
            if kind == "Service":
                check_service(label, o, pods)
            elif kind == "NetworkPolicy":
                check_networkpolicy(label, o, pods, objs)
            elif kind == "PodMonitor":
                check_podmonitor(label, o, pods)
            elif kind == "PodDisruptionBudget":
                check_selector_only(label, o, pods, (o.get("spec") or {}).get("selector"), "selects the gateway's pods")
            elif kind == "Ingress" and AUTH + "auth-url" in ((o.get("metadata") or {}).get("annotations") or {}):
                check_forward_auth(label, o, objs, pods, configs)

    print(f"check-deploy: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
PY

"$PY" "$tmp/check_deploy.py" \
  --kubectl "$KUBECTL" --bin "$PORTCULLIS_BIN" --tmp "$tmp" --out target/deploy-rendered \
  --versions "$DEPLOY_K8S_VERSIONS" "${dirs[@]}"
