#!/usr/bin/env python3
"""Structural checks of the deployment artifacts in deploy/, with real
parsers: PyYAML for the compose file and the Kubernetes manifests (whose
schemas kubernetes-validate checks separately), tomllib for the TOML they
embed, dockerfile-parse for the Dockerfile, shlex for every command line.

Every `quorate` command line found in the systemd units, the compose file
and the manifests (also inside `sh -c` scripts) is checked against the
`--help` of the real binary: its subcommand must exist, and every `--flag`
must be one that subcommand takes. TOML configs must use only keys of
ServerConfig / AgentConfig (read from src/quorate/src/config.rs) and group
files only keys of a group spec.

usage: check.py QUORATE_BIN K8S_VERSION   (run from the repository root)
Prints one line per check group and every failure; exits 1 on any.
"""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

# The repository (the self-test of test-deploy-artifacts.sh points this at
# a copy with one artifact broken).
ROOT = Path(os.environ.get("DEPLOY_CHECK_ROOT", ".")).resolve()
FAILURES = []


def fail(where, message):
    FAILURES.append(f"{where}: {message}")


def expect(cond, where, message):
    if not cond:
        fail(where, message)
    return cond


# --- the binary's command-line interface --------------------------------

class Cli:
    """The subcommands and flags of the real `quorate`, from its --help."""

    def __init__(self, binary):
        self.binary = binary
        self.cache = {}

    def help(self, path):
        key = tuple(path)
        if key not in self.cache:
            out = subprocess.run([self.binary, *path, "--help"], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"`quorate {' '.join(path)} --help` failed: {out.stderr.strip()}")
            self.cache[key] = parse_help(out.stdout)
        return self.cache[key]

    def check(self, argv, where):
        """argv: the arguments after `quorate`."""
        path, i = [], 0
        while i < len(argv):
            tok = argv[i]
            commands, flags = self.help(path)
            if tok.startswith("--"):
                name, _, inline = tok[2:].partition("=")
                if name not in flags:
                    fail(where, f"`quorate {' '.join(path)}` has no flag --{name} (in: {' '.join(argv)})")
                    return None
                if flags[name] and not inline:
                    i += 1  # its value
            elif tok.startswith("-") and len(tok) > 1:
                fail(where, f"short flag {tok}: use the long form so that it can be checked")
                return None
            elif commands and tok not in commands:
                fail(where, f"`quorate {' '.join(path)}` has no subcommand {tok!r} (in: {' '.join(argv)})")
                return None
            elif commands:
                path.append(tok)
            # else: a positional argument of the leaf subcommand
            i += 1
        commands, _ = self.help(path)
        expect(not commands, where, f"`quorate {' '.join(argv)}` names no subcommand of `{' '.join(path)}`")
        return path


def parse_help(text):
    """clap's help: the `Commands:` names, and each `--flag` with whether
    it takes a value (`--flag <VALUE>`)."""
    commands, flags, section = set(), {}, None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section = line[:-1]
            continue
        m = re.match(r"^\s+(?:-\w, )?--([a-z0-9-]+)( [<\[])?", line)
        if m:
            flags[m.group(1)] = m.group(2) is not None
            continue
        m = re.match(r"^  ([a-z][\w-]*)(\s|$)", line)
        if section == "Commands" and m and m.group(1) != "help":
            commands.add(m.group(1))
    return commands, flags


def quorate_calls(script):
    """Every `quorate ...` command line in a shell script (sh -c, a unit's
    ExecStart), split at the shell's command separators."""
    calls = []
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = ""  # `${POD_NAME##*-}` is no comment
    cur = []
    for tok in list(lexer) + [";"]:
        if tok and set(tok) <= set(";&|()") or tok in ("then", "do", "else", "fi", "done"):
            if cur:
                calls.append(cur)
            cur = []
        else:
            cur.append(tok)
    out = []
    for words in calls:
        while words and (words[0] in ("exec", "if", "while", "until", "!") or re.match(r"^[A-Za-z_]+=", words[0])):
            words = words[1:]
        if words and (words[0] == "quorate" or words[0].endswith("/quorate")):
            out.append(words[1:])
    return out


# --- config keys --------------------------------------------------------

def struct_fields(name):
    """The pub fields of `pub struct NAME` in config.rs (the keys its TOML
    takes: unknown keys are refused there)."""
    src = (ROOT / "src/quorate/src/config.rs").read_text()
    m = re.search(r"pub struct " + name + r" \{(.*?)\n\}", src, re.S)
    if not m:
        raise RuntimeError(f"no struct {name} in config.rs")
    body = m.group(1)
    skipped = set(re.findall(r"#\[serde\(skip\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):", body))
    return set(re.findall(r"^\s*pub (\w+):", body, re.M)) - skipped


GROUP_KEYS = {"name", "policy", "failover", "members"}
MEMBER_KEYS = {"id", "heartbeat", "data", "priority", "announce"}
FAILOVER_KEYS = {"lease_ttl_ms", "max_lag_bytes", "min_failover_interval_ms", "initial_primary"}


def check_toml_keys(text, allowed, where):
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"not TOML: {e}")
        return {}
    for k in doc:
        expect(k in allowed, where, f"unknown key {k!r} (not a field of the config)")
    return doc


def check_group(text, where):
    doc = check_toml_keys(text, GROUP_KEYS, where)
    for k in doc.get("failover", {}):
        expect(k in FAILOVER_KEYS, where, f"unknown [failover] key {k!r}")
    members = doc.get("members", [])
    for m in members:
        for k in m:
            expect(k in MEMBER_KEYS, where, f"unknown [[members]] key {k!r}")
    ids = [m.get("id") for m in members]
    expect(len(ids) == len(set(ids)) and len(ids) >= 2, where, f"members must be 2 or more distinct ids: {ids}")
    ip = doc.get("failover", {}).get("initial_primary")
    expect(ip is None or ip in ids, where, f"initial_primary {ip!r} is not a member")
    return doc


def url_host_port(url):
    m = re.match(r"^rediss?://(?:[^@/]*@)?([^:/]+):(\d+)", url)
    return (m.group(1), int(m.group(2))) if m else (None, None)


# --- systemd ------------------------------------------------------------

def check_systemd(cli):
    units = sorted((ROOT / "deploy/systemd").glob("*.service"))
    expect(len(units) == 2, "deploy/systemd", f"expected quorate.service and quorate-agent@.service, got {units}")
    for unit in units:
        where = str(unit.relative_to(ROOT))
        text = unit.read_text()
        keys = {}
        for line in text.splitlines():
            if "=" in line and not line.startswith("#"):
                k, _, v = line.partition("=")
                keys.setdefault(k.strip(), []).append(v.strip())
        for k, want in [("Type", "notify"), ("NotifyAccess", "main"), ("Restart", "on-failure")]:
            expect(keys.get(k) == [want], where, f"{k}= should be {want}")
        for k in ("WatchdogSec", "TimeoutStopSec", "ProtectSystem", "NoNewPrivileges", "DynamicUser"):
            expect(k in keys, where, f"no {k}=")
        execs = keys.get("ExecStart", [])
        expect(len(execs) == 1, where, "one ExecStart= expected")
        for line in execs:
            calls = quorate_calls(line)
            expect(len(calls) == 1, where, f"ExecStart= should run quorate: {line}")
            for argv in calls:
                path = cli.check(argv, where)
                want = ["agent"] if "@" in unit.name else ["server"]
                expect(path == want, where, f"ExecStart= runs `quorate {path}`, expected {want}")
        # every %d/NAME the command reads is a credential it loads
        creds = {v.split(":", 1)[0] for v in keys.get("LoadCredential", [])}
        for used in re.findall(r"%d/([\w.-]+)", " ".join(execs)):
            expect(used in creds, where, f"ExecStart= reads %d/{used}, which no LoadCredential= provides")


# --- Kubernetes ---------------------------------------------------------

def k8s_docs():
    docs = []
    for f in sorted((ROOT / "deploy/kubernetes").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((str(f.relative_to(ROOT)), d))
    return docs


def container_calls(c):
    cmd = (c.get("command") or []) + (c.get("args") or [])
    if cmd[:2] == ["/bin/sh", "-c"]:
        return quorate_calls(cmd[2])
    if cmd and cmd[0] == "quorate":
        return [cmd[1:]]
    return []


def check_kubernetes(cli, version):
    docs = k8s_docs()
    by_kind = {}
    for f, d in docs:
        by_kind.setdefault(d["kind"], []).append((f, d))
    services = {d["metadata"]["name"]: d for _, d in by_kind.get("Service", [])}
    configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    pdbs = [d for _, d in by_kind.get("PodDisruptionBudget", [])]
    stss = {d["metadata"]["name"]: (f, d) for f, d in by_kind.get("StatefulSet", [])}
    expect({"quorate", "redis"} <= set(stss), "deploy/kubernetes", f"StatefulSets quorate and redis expected: {list(stss)}")
    server_fields, agent_fields = struct_fields("ServerConfig"), struct_fields("AgentConfig")

    for name, (f, sts) in stss.items():
        where = f"{f} StatefulSet/{name}"
        spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        svc = services.get(spec["serviceName"])
        if expect(svc is not None, where, f"serviceName {spec['serviceName']} is no Service"):
            expect(svc["spec"].get("clusterIP") == "None", where, "its serviceName must be headless")
            expect(svc["spec"].get("publishNotReadyAddresses") is True, where, "its headless Service needs publishNotReadyAddresses")
            expect(svc["spec"]["selector"].items() <= labels.items(), where, "the headless Service does not select its pods")
        expect(any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), where, "no PodDisruptionBudget selects its pods")
        anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
        expect(any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"].items() <= labels.items() for t in anti),
               where, "no required podAntiAffinity on kubernetes.io/hostname for its own pods")
        expect(spec.get("volumeClaimTemplates"), where, "no volumeClaimTemplates")
        volumes = {v["name"]: v for v in pod.get("volumes", [])} | {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
        for c in pod["containers"]:
            cw = f"{where} container {c['name']}"
            for m in c.get("volumeMounts", []):
                expect(m["name"] in volumes, cw, f"mounts unknown volume {m['name']}")
            for m in c.get("volumeMounts", []):
                v = volumes.get(m["name"], {})
                if "configMap" in v:
                    cm = configmaps.get(v["configMap"]["name"])
                    if expect(cm is not None, cw, f"ConfigMap {v['configMap']['name']} missing"):
                        expect("subPath" not in m or m["subPath"] in cm["data"], cw, f"ConfigMap has no key {m.get('subPath')}")
            for argv in container_calls(c):
                cli.check(argv, cw)
            for hook in ("preStop", "postStart"):
                h = c.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command")
                if h and h[:2] == ["/bin/sh", "-c"]:
                    for argv in quorate_calls(h[2]):
                        cli.check(argv, f"{cw} {hook}")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                g = c.get(probe, {}).get("httpGet")
                if g:
                    expect(g["port"] in ports, cw, f"{probe} port {g['port']} is not a named port of the container")

    # coordinators: config, probes, peers
    f, sts = stss["quorate"]
    where = f"{f} StatefulSet/quorate"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    cm = configmaps["quorate-server"]["data"]["server.toml"]
    conf = check_toml_keys(cm, server_fields, f"{f} ConfigMap/quorate-server server.toml")
    http_port = int(conf.get("http_listen", ":0").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expect(ports.get("http") == http_port, where, f"port http {ports.get('http')} is not http_listen's {http_port}")
    expect(ports.get("grpc") == int(conf["listen"].rsplit(":", 1)[1]), where, "port grpc is not listen's")
    expect(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", where, "readinessProbe must be /readyz")
    expect(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/livez", where, "livenessProbe must be /livez")
    ns = sts["metadata"]["namespace"]
    want = ",".join(f"{i + 1}=quorate-{i}.{sts['spec']['serviceName']}.{ns}.svc:{ports['grpc']}" for i in range(sts["spec"]["replicas"]))
    expect(conf.get("peers") == want, where, f"peers {conf.get('peers')!r} should name every pod: {want!r}")
    calls = container_calls(c)
    expect(len(calls) == 1 and calls[0][0] == "server", where, "the container should exec `quorate server`")

    # the pair: group file, agents, preStop switchover
    f, sts = stss["redis"]
    where = f"{f} StatefulSet/redis"
    data = configmaps["quorate-group-db"]["data"]
    group = check_group(data["db.toml"], f"{f} ConfigMap/quorate-group-db db.toml")
    agent_conf = check_toml_keys(data["agent.toml"], agent_fields, f"{f} ConfigMap/quorate-group-db agent.toml")
    expect(agent_conf.get("endpoints") == ",".join(p.split("=", 1)[1] for p in conf["peers"].split(",")), where,
           "the agents' endpoints should be the coordinators' peers")
    expect(agent_conf.get("group") == group.get("name"), where, "agent.toml's group is not the group file's")
    containers = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    expect({"redis", "heartbeat", "agent"} <= set(containers), where, f"redis, heartbeat, agent containers expected: {list(containers)}")
    replicas = sts["spec"]["replicas"]
    expect(len(group.get("members", [])) == replicas, where, "one member per pod expected")
    for k, m in enumerate(group.get("members", [])):
        expect(m["id"] == f"db-{k + 1}", where, f"pod redis-{k} is member db-{k + 1}, the group says {m['id']}")
        for key, port in (("heartbeat", 6380), ("data", 6379)):
            host, p = url_host_port(m.get(key, ""))
            expect((host, p) == (f"redis-{k}.redis.{ns}.svc", port), where, f"{m['id']} {key} URL {m.get(key)!r} is not pod redis-{k}:{port}")
    pre = containers["agent"].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_calls = quorate_calls(pre[2]) if pre[:2] == ["/bin/sh", "-c"] else []
    expect(any(a[:1] == ["switchover"] for a in pre_calls), where, "the agent's preStop should run `quorate switchover`")
    expect(any(a[:2] == ["lease", "get"] for a in pre_calls), where, "the preStop should switch over only when this member holds the lease")
    grace = sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    waits = [int(a[a.index("--wait-s") + 1]) for a in pre_calls if "--wait-s" in a]
    expect(waits and max(waits) < grace, where, f"the switchover's --wait-s {waits} must end within terminationGracePeriodSeconds {grace}")
    expect(version, "kubernetes", "no Kubernetes version")


# --- Dockerfile and compose ---------------------------------------------

def check_dockerfile():
    where = "deploy/docker/Dockerfile"
    df = DockerfileParser(path=str(ROOT / where))
    stages, workdir, stage = [], {}, None
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    ignored = [l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    copied = []
    for ins in df.structure:
        cmd, value = ins["instruction"], ins["value"]
        if cmd == "FROM":
            parts = value.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append((stage, parts[0]))
        elif cmd == "WORKDIR":
            workdir[stage] = value
        elif cmd == "COPY":
            args = shlex.split(value)
            opts = [a for a in args if a.startswith("--")]
            srcs = [a for a in args if not a.startswith("--")][:-1]
            src_stage = next((o.split("=", 1)[1] for o in opts if o.startswith("--from=")), None)
            if src_stage is None:
                for s in srcs:
                    expect((ROOT / s).exists(), where, f"COPY {s}: no such path in the repository (the build context)")
                    expect(not any(s == i or s.startswith(i + "/") for i in ignored), where, f"COPY {s} is excluded by .dockerignore")
                    copied.append(s.rstrip("/"))
            else:
                names = [n for n, _ in stages[:-1]]
                expect(src_stage in names, where, f"COPY --from={src_stage}: no earlier stage of that name ({names})")
                for s in srcs:
                    wd = workdir.get(src_stage, "/")
                    expect(s.startswith(wd + "/target/release/"), where, f"COPY --from={src_stage} {s}: not a release artifact under {wd}/target")
    expect(len(stages) >= 2, where, "a multi-stage build expected")
    if stages:
        base = stages[0][1]
        m = re.match(r"rust:(\d+)\.(\d+)", base)
        want = tuple(int(x) for x in cargo["workspace"]["package"]["rust-version"].split("."))
        expect(m and (int(m.group(1)), int(m.group(2))) >= want[:2], where, f"builder {base} is older than rust-version {want}")
        expect(stages[-1][1].startswith("debian:") and "slim" in stages[-1][1], where, f"runtime {stages[-1][1]} should be Debian slim")
    for member in cargo["workspace"]["members"] + ["Cargo.toml", "Cargo.lock", "proto"]:
        expect(any(member == c or member.startswith(c + "/") for c in copied), where, f"{member} is not copied into the builder")
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    expect("cargo build --release --locked" in runs and "--bin quorate" in runs, where, "the builder should `cargo build --release --locked ... --bin quorate`")
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    expect(users and not users[-1].startswith(("root", "0")), where, "the image should run as a non-root USER")
    entry = [i["value"] for i in df.structure if i["instruction"] == "ENTRYPOINT"]
    expect(entry and "quorate" in entry[-1], where, "ENTRYPOINT should be quorate")


def check_compose(cli):
    where = "deploy/docker/compose.yaml"
    doc = yaml.safe_load((ROOT / where).read_text())
    services = doc.get("services", {})
    want = {"certs", "group", "coordinator-1", "coordinator-2", "coordinator-3", "redis-1", "redis-2", "hb-1", "hb-2", "agent-1", "agent-2"}
    expect(want <= set(services), where, f"missing services: {sorted(want - set(services))}")
    volumes = set(doc.get("volumes", {}) or {})
    issued, peers_seen, nodes = set(), set(), {}
    base = ROOT / "deploy/docker"
    for name, s in services.items():
        sw = f"{where} service {name}"
        if "build" in s:
            ctx = (base / s["build"]["context"]).resolve()
            expect((ctx / s["build"]["dockerfile"]).is_file(), sw, f"no Dockerfile {s['build']['dockerfile']} in context {ctx}")
        for dep in s.get("depends_on", {}):
            expect(dep in services, sw, f"depends_on unknown service {dep}")
        for v in s.get("volumes", []):
            src = v.split(":", 1)[0]
            if src.startswith("."):
                expect((base / src).exists(), sw, f"bind mount {src} does not exist")
            else:
                expect(src in volumes, sw, f"volume {src} is not declared")
        if s.get("image", "").startswith("quorate:"):
            entry = s.get("entrypoint")
            cmd = s.get("command", [])
            calls = quorate_calls(cmd[0]) if entry == ["/bin/sh", "-c"] else [cmd]
            for argv in calls:
                path = cli.check(argv, sw)
                if path == ["certs", "issue"]:
                    issued.add(argv[argv.index("--name") + 1])
                if path == ["server"]:
                    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
                    nodes[name] = opts
                    peers_seen.add(opts.get("peers"))
    # certs are issued with shell loops: expand `$n`/`$m` over their lists
    script = services.get("certs", {}).get("command", [""])[0]
    for var, values in re.findall(r"for (\w+) in ([\w ]+); do", script):
        for name in list(issued):
            if f"${var}" in name:
                issued.discard(name)
                issued.update(name.replace(f"${var}", v) for v in values.split())
    expect(len(nodes) == 3, where, f"3 coordinators expected: {sorted(nodes)}")
    expect(len(peers_seen) == 1, where, f"every coordinator should have the same peers: {peers_seen}")
    if nodes and len(peers_seen) == 1:
        peers = dict(p.split("=", 1) for p in next(iter(peers_seen)).split(","))
        for svc, opts in nodes.items():
            nid = opts.get("node-id")
            port = opts.get("listen", ":").rsplit(":", 1)[1]
            expect(peers.get(nid) == f"{svc}:{port}", where, f"{svc} is node {nid} but peers say {peers.get(nid)}")
            expect(opts.get("tls-cert", "").endswith(f"/node-{nid}.crt"), where, f"{svc} should present node-{nid}.crt")
            expect(f"node-{nid}" in issued, where, f"node-{nid} is not issued by the certs service")
    group = check_group((base / "db.toml").read_text(), "deploy/docker/db.toml")
    ids = [m["id"] for m in group.get("members", [])]
    for m in group.get("members", []):
        for key in ("heartbeat", "data"):
            host, port = url_host_port(m.get(key, ""))
            svc = services.get(host)
            if expect(svc is not None, where, f"{m['id']} {key} host {host} is no service"):
                cmd = svc.get("command", [])
                expect("--port" in cmd and cmd[cmd.index("--port") + 1] == str(port), where, f"{host} does not listen on {port}")
    for name, s in services.items():
        cmd = s.get("command", [])
        if "agent" in cmd:
            opts = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
            expect(opts.get("member") in ids, where, f"{name} runs member {opts.get('member')}, not one of {ids}")
            expect(opts.get("cert", "").endswith(f"/{opts.get('member')}.crt"), where, f"{name} should present its member's certificate")
            expect(opts.get("member") in issued, where, f"{opts.get('member')} is not issued by the certs service")
    expect("admin" in issued, where, "no admin certificate for the group service")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: check.py QUORATE_BIN KUBERNETES_VERSION")
    cli = Cli(sys.argv[1])
    for name, check in [
        ("systemd units", lambda: check_systemd(cli)),
        ("Kubernetes manifests", lambda: check_kubernetes(cli, sys.argv[2])),
        ("Dockerfile", check_dockerfile),
        ("compose file", lambda: check_compose(cli)),
    ]:
        before = len(FAILURES)
        check()
        print(f"{'ok  ' if len(FAILURES) == before else 'FAIL'} {name}")
    for f in FAILURES:
        print(f"  {f}", file=sys.stderr)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
