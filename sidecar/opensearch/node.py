"""A local single-node OpenSearch (ml-commons, k-NN, neural-search) built from published Maven artifacts.

`rerank-sidecar opensearch node start|stop|status`: downloads with Maven (`mvn`, the ordinary client) into the
user cache, assembles core + plugins + the modules the integ-test zip lacks, and runs the node on 127.0.0.1
with security off and a 1 GB heap. OpenSearch refuses to run as root, so root runs it as a dedicated user.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NODE_USER = "rerank-opensearch"
DEFAULT_PORT = 9200
DEFAULT_HEAP = "1g"
ROOT_HOME = Path("/var/lib/rerank-sidecar/opensearch")
# Bumped whenever the assembly below changes, so an old assembled node is rebuilt rather than reused.
LAYOUT = 1


class NodeError(RuntimeError):
    """A failure the user can act on; the message is one line that says what to do."""


@dataclass(frozen=True)
class Module:
    """A module the integ-test zip lacks, published as a plugin jar plus its direct dependencies."""

    name: str
    version: str  # Maven version of the jar (a patch release may be missing for some modules)
    classname: str
    extends: tuple[str, ...] = ()
    policy: str = ""  # plugin-security.policy, for modules that need permissions


@dataclass(frozen=True)
class Release:
    """One OpenSearch version whose core, plugins and modules all resolve on Maven Central."""

    version: str  # core, e.g. 2.19.1
    java: tuple[int, int]  # supported Java majors, inclusive
    modules: tuple[Module, ...]
    plugins: tuple[str, ...] = (
        "opensearch-job-scheduler",
        "opensearch-ml-plugin",
        "opensearch-knn",
        "neural-search",
    )

    @property
    def plugin_version(self) -> str:
        return f"{self.version}.0"


_PAINLESS_POLICY = """grant {
  // painless generates classes for compiled scripts
  permission java.lang.RuntimePermission "createClassLoader";
  permission java.lang.RuntimePermission "getClassLoader";
};
"""


def _modules(v: str, pipeline_common: str) -> tuple[Module, ...]:
    return (
        Module("lang-painless", v, "org.opensearch.painless.PainlessPlugin", policy=_PAINLESS_POLICY),
        Module(
            "analysis-common", v, "org.opensearch.analysis.common.CommonAnalysisPlugin", ("lang-painless",)
        ),
        Module(
            "search-pipeline-common",
            pipeline_common,
            "org.opensearch.search.pipeline.common.SearchPipelineCommonModulePlugin",
        ),
    )


# The k-NN zip is served for 2.19.1.0 (not 2.19.2+), so 2.19.1 it is; search-pipeline-common 2.19.1 is not
# published, and 2.19.2's jar (same processors, same plugin API) runs on a 2.19.1 core.
RELEASES = {
    "2.19.1": Release("2.19.1", (17, 23), _modules("2.19.1", "2.19.2")),
}
DEFAULT_VERSION = "2.19.1"

Log = Callable[[str], None]


def cache_root() -> Path:
    from sidecar.eval.cache import cache_dir

    return cache_dir() / "opensearch"


def default_home(version: str, port: int = DEFAULT_PORT) -> Path:
    """Where the node of this version and port is assembled and keeps its data: the user cache, or a folder
    the node user owns when running as root (root's home and pytest's temporary folders are closed to it)."""
    if os.geteuid() == 0:
        return ROOT_HOME / f"{version}-{port}"
    return cache_root() / f"node-{version}-{port}"


# ---- Java -------------------------------------------------------------------------------------
def _java_major(home: Path) -> int | None:
    release = home / "release"
    if not (home / "bin" / "java").exists() or not release.exists():
        return None
    m = re.search(r'JAVA_VERSION="(\d+)', release.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def find_java(release: Release) -> Path:
    """A JDK whose major version this release runs on: $OPENSEARCH_JAVA_HOME, $JAVA_HOME, /usr/lib/jvm/*."""
    lo, hi = release.java
    candidates = [os.environ.get("OPENSEARCH_JAVA_HOME"), os.environ.get("JAVA_HOME")]
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += [str(p) for p in sorted(jvm.iterdir()) if not p.is_symlink()]
    for c in candidates:
        if c and (major := _java_major(Path(c))) is not None and lo <= major <= hi:
            return Path(c)
    raise NodeError(
        f"OpenSearch {release.version} needs a JDK {lo}-{hi} and none was found: install one "
        "(e.g. apt-get install openjdk-17-jdk-headless) or set OPENSEARCH_JAVA_HOME"
    )


# ---- download -----------------------------------------------------------------------------------
@dataclass
class Artifact:
    group: str
    artifact: str
    version: str
    packaging: str

    @property
    def coords(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}:{self.packaging}"

    @property
    def filename(self) -> str:
        return f"{self.artifact}-{self.version}.{self.packaging}"


def artifacts(release: Release) -> list[Artifact]:
    """Everything the node is built from, in the order it is fetched (largest last is no help: core first)."""
    out = [Artifact("org.opensearch.distribution.integ-test-zip", "opensearch", release.version, "zip")]
    out += [Artifact("org.opensearch.plugin", p, release.plugin_version, "zip") for p in release.plugins]
    out += [Artifact("org.opensearch.plugin", m.name, m.version, "jar") for m in release.modules]
    return out


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise NodeError("Maven (mvn) is needed to download OpenSearch: install it (apt-get install maven)")
    return mvn


@dataclass
class Progress:
    """A live line on a terminal; a log line every `every_s` seconds otherwise (CI logs stay readable)."""

    log: Log
    tty: bool = field(default_factory=lambda: sys.stdout.isatty())
    every_s: float = 10.0
    _last: float = 0.0

    def update(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stdout.write("\r\033[K" + text + ("\n" if final else ""))
            sys.stdout.flush()
        elif final or now - self._last >= self.every_s:
            self.log(text)
            self._last = now


def _dir_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run_mvn(args: list[str], watch: Path, label: str, progress: Progress, java: Path) -> None:
    env = {**os.environ, "JAVA_HOME": str(java)}
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([_mvn(), "-B", "-q", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            mb = _dir_bytes(watch) / 1e6
            progress.update(f"downloading {label}: {mb:.0f} MB ({time.monotonic() - t0:.0f} s)")
            time.sleep(0.5)
        if proc.returncode != 0:
            out.seek(0)
            text = out.read()
            missing = "not found" in text or "Could not find artifact" in text or "Couldn't download" in text
            raise NodeError(
                f"Maven could not {'find' if missing else 'download'} {label}: "
                + (
                    "the artifact is not published for this version"
                    if missing
                    else "check the network and `mvn -v` (output: " + " ".join(text.split())[-300:] + ")"
                )
            )
    progress.update(
        f"downloaded {label}: {_dir_bytes(watch) / 1e6:.0f} MB in {time.monotonic() - t0:.0f} s", final=True
    )


def _pom(deps: list[tuple[str, str, str, str]]) -> str:
    items = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>"
        f"<type>{t}</type></dependency>"
        for g, a, v, t in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        "<groupId>local</groupId><artifactId>rerank-sidecar-opensearch</artifactId><version>0</version>"
        f"<packaging>pom</packaging><dependencies>{items}</dependencies></project>"
    )


def _copy(
    deps: list[tuple[str, str, str, str]], out: Path, repo: Path, label: str, java: Path, log: Log
) -> None:
    """One Maven run that resolves `deps` (not their dependencies) and copies them into `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_pom(deps))
        _run_mvn(
            [
                f"-Dmaven.repo.local={repo}",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DexcludeTransitive=true",
                f"-DoutputDirectory={out}",
            ],
            repo,
            label,
            Progress(log),
            java,
        )


def _direct_dependencies(pom: Path) -> list[tuple[str, str, str, str]]:
    """compile/runtime dependencies a module's POM declares (painless: antlr, asm, its SPI)."""
    import xml.etree.ElementTree as ET

    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    out = []
    for d in ET.parse(pom).getroot().findall("m:dependencies/m:dependency", ns):
        scope = d.findtext("m:scope", "compile", ns)
        if scope in ("compile", "runtime"):
            g, a, v = (d.findtext(f"m:{k}", "", ns) for k in ("groupId", "artifactId", "version"))
            out.append((g, a, v, "jar"))
    return out


def download(release: Release, java: Path, log: Log) -> Path:
    """Fetch every artifact (two Maven runs) into the user cache; returns the folder holding them."""
    out = cache_root() / "downloads" / release.version
    done = out / ".complete"
    if done.exists():
        return out
    repo = cache_root() / "m2"
    arts = artifacts(release)
    wanted = [(a.group, a.artifact, a.version, a.packaging) for a in arts]
    wanted += [("org.opensearch.plugin", m.name, m.version, "pom") for m in release.modules]
    _copy(wanted, out, repo, f"OpenSearch {release.version} core, plugins and modules", java, log)
    deps: list[tuple[str, str, str, str]] = []
    for m in release.modules:
        deps += _direct_dependencies(out / f"{m.name}-{m.version}.pom")
    if deps:
        _copy(deps, out / "deps", repo, "the modules' dependencies", java, log)
    done.touch()
    return out


# ---- assembly -----------------------------------------------------------------------------------
def _descriptor(release: Release, m: Module, java_major: int) -> str:
    lines = [
        f"description={m.name} module (assembled by rerank-sidecar)",
        f"version={release.version}",
        f"name={m.name}",
        f"classname={m.classname}",
        f"java.version={java_major}",
        f"opensearch.version={release.version}",
    ]
    if m.extends:
        lines.append("extended.plugins=" + ",".join(m.extends))
    return "\n".join(lines) + "\n"


def _unzip_flat(zip_path: Path, dest: Path) -> None:
    """Extract, dropping a single top-level folder if the archive has one; keep the execute bits."""
    with zipfile.ZipFile(zip_path) as z:
        names = [n for n in z.namelist() if n and not n.endswith("/")]
        tops = {n.split("/", 1)[0] for n in names}
        strip = len(tops) == 1 and all("/" in n for n in names)
        for info in z.infolist():
            if info.is_dir():
                continue
            rel = info.filename.split("/", 1)[1] if strip else info.filename
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)
            elif rel.startswith("bin/") or "/bin/" in rel:
                target.chmod(0o755)


def _descriptor_name(plugin_dir: Path) -> str:
    text = (plugin_dir / "plugin-descriptor.properties").read_text()
    m = re.search(r"^name=(.+)$", text, re.M)
    if not m:
        raise NodeError(f"{plugin_dir} has no plugin name in its descriptor")
    return m.group(1).strip()


def _config(port: int) -> str:
    return "\n".join(
        [
            "cluster.name: rerank-sidecar-local",
            "node.name: node-1",
            "network.host: 127.0.0.1",
            f"http.port: {port}",
            "discovery.type: single-node",
            "path.data: data",
            "path.logs: logs",
            # A laptop disk is often fuller than the default watermarks allow.
            "cluster.routing.allocation.disk.threshold_enabled: false",
            # One node with no ml role must still run remote models; small heaps must not block them.
            "plugins.ml_commons.only_run_on_ml_node: false",
            "plugins.ml_commons.jvm_heap_memory_threshold: 100",
            "plugins.ml_commons.native_memory_threshold: 100",
            "plugins.ml_commons.disk_free_space_threshold: -1",
            "",
        ]
    )


def assemble(release: Release, downloads: Path, home: Path, java: Path, log: Log) -> None:
    """Lay out the node in `home` (rebuilt from scratch unless an assembly of this layout is there)."""
    stamp = home / ".assembled"
    want = json.dumps({"version": release.version, "layout": LAYOUT})
    if stamp.exists() and stamp.read_text() == want:
        return
    t0 = time.monotonic()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    arts = artifacts(release)
    _unzip_flat(downloads / arts[0].filename, home)
    java_major = _java_major(java) or release.java[0]
    for m in release.modules:
        d = home / "modules" / m.name
        d.mkdir(parents=True)
        shutil.copy2(downloads / f"{m.name}-{m.version}.jar", d)
        for _, a, v, _ in _direct_dependencies(downloads / f"{m.name}-{m.version}.pom"):
            shutil.copy2(downloads / "deps" / f"{a}-{v}.jar", d)
        (d / "plugin-descriptor.properties").write_text(_descriptor(release, m, java_major))
        if m.policy:
            (d / "plugin-security.policy").write_text(m.policy)
    for art in arts[1 : 1 + len(release.plugins)]:
        tmp = home / "plugins" / f".{art.artifact}"
        _unzip_flat(downloads / art.filename, tmp)
        tmp.rename(home / "plugins" / _descriptor_name(tmp))
    stamp.write_text(want)
    log(f"assembled OpenSearch {release.version} in {home} ({time.monotonic() - t0:.0f} s)")


# ---- run ----------------------------------------------------------------------------------------
def ensure_user(name: str = NODE_USER) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if not useradd:
        raise NodeError(f"OpenSearch refuses to run as root and there is no useradd to create {name!r}")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for n in dirs + files:
            os.lchown(os.path.join(root, n), uid, gid)
    # Every directory above must be traversable by the node user.
    for parent in path.parents:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


def _get(url: str, timeout: float = 2.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode()) if r.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def health(port: int) -> dict[str, object] | None:
    return _get(f"http://127.0.0.1:{port}/_cluster/health")


def _pidfile(home: Path) -> Path:
    return home / "opensearch.pid"


def _running_pid(home: Path) -> int | None:
    try:
        pid = int(_pidfile(home).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _log_tail(home: Path, n: int = 400) -> str:
    log = home / "logs" / "rerank-sidecar-local.log"
    out = home / "logs" / "stdout.log"
    text = ""
    for p in (log, out):
        if p.exists():
            text += p.read_text(errors="replace")[-20000:]
    errors = [ln for ln in text.splitlines() if "ERROR" in ln or "Exception" in ln]
    return (errors[-1] if errors else text.strip().splitlines()[-1] if text.strip() else "")[:n]


def start(
    version: str = DEFAULT_VERSION,
    port: int = DEFAULT_PORT,
    heap: str = DEFAULT_HEAP,
    home: Path | None = None,
    timeout_s: float = 300.0,
    log: Log = print,
) -> dict[str, object]:
    """Download (once), assemble (once), start and wait for green; returns timings. Idempotent: a node
    already answering on `port` is left as it is."""
    release = RELEASES.get(version)
    if release is None:
        raise NodeError(
            f"OpenSearch {version} is not one this command can build; choose from {sorted(RELEASES)}"
        )
    home = home or default_home(version, port)
    got = health(port)
    if got is not None:
        log(f"OpenSearch already answers on 127.0.0.1:{port} (status {got.get('status')})")
        return {"already_running": True}
    java = find_java(release)
    t0 = time.monotonic()
    repo = download(release, java, log)
    t_download = time.monotonic() - t0
    assemble(release, repo, home, java, log)
    t_assemble = time.monotonic() - t0 - t_download
    (home / "config" / "opensearch.yml").write_text(_config(port))
    (home / "logs").mkdir(exist_ok=True)
    (home / "data").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OPENSEARCH_JAVA_HOME": str(java),
        "OPENSEARCH_JAVA_OPTS": f"-Xms{heap} -Xmx{heap}",
        "OPENSEARCH_PATH_CONF": str(home / "config"),
    }
    env.pop("JAVA_HOME", None)
    cmd = [str(home / "bin" / "opensearch"), "-d", "-p", str(_pidfile(home))]
    if os.geteuid() == 0:
        user = ensure_user()
        _chown_tree(home, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser") or shutil.which("setpriv")
        if runuser is None:
            raise NodeError("running as root needs runuser (util-linux) to start OpenSearch as another user")
        env["HOME"] = str(home)
        cmd = [runuser, "-u", NODE_USER, "--", *cmd]
    t1 = time.monotonic()
    with (home / "logs" / "stdout.log").open("ab") as out:
        r = subprocess.run(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if r.returncode != 0:
        raise NodeError(f"OpenSearch did not start (exit {r.returncode}): {_log_tail(home)}")
    progress = Progress(log)
    seen_pid = False  # the node writes its pid file early in bootstrap, seconds after the launcher returns
    while True:
        got = health(port)
        if got is not None and got.get("status") == "green":
            break
        waited = time.monotonic() - t1
        alive = _running_pid(home) is not None
        seen_pid = seen_pid or alive
        if (seen_pid and not alive) or (not seen_pid and waited > 60):
            raise NodeError(f"OpenSearch exited while starting: {_log_tail(home)} (logs in {home / 'logs'})")
        if waited > timeout_s:
            raise NodeError(f"OpenSearch was not green after {timeout_s:.0f} s: {_log_tail(home)}")
        status = got.get("status") if got else "not answering yet"
        progress.update(f"waiting for OpenSearch on 127.0.0.1:{port}: {status} ({waited:.0f} s)")
        time.sleep(1.0)
    t_start = time.monotonic() - t1
    progress.update(f"OpenSearch {version} is green on http://127.0.0.1:{port} ({t_start:.0f} s)", final=True)
    return {
        "download_s": round(t_download, 1),
        "assemble_s": round(t_assemble, 1),
        "start_s": round(t_start, 1),
        "home": str(home),
    }


def stop(
    version: str = DEFAULT_VERSION,
    home: Path | None = None,
    timeout_s: float = 60.0,
    log: Log = print,
    port: int = DEFAULT_PORT,
) -> bool:
    """SIGTERM the node started from `home` and wait for it to exit; False when none was running."""
    home = home or default_home(version, port)
    pid = _running_pid(home)
    if pid is None:
        log("no OpenSearch node started by this command is running")
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            log(f"stopped OpenSearch (pid {pid})")
            _pidfile(home).unlink(missing_ok=True)
            return True
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    log(f"OpenSearch (pid {pid}) did not stop within {timeout_s:.0f} s: killed")
    return True
