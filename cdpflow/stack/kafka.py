"""Kafka in the local stack: one Apache Kafka 4.4 process in KRaft mode (broker and controller).

There is no Kafka in Debian; `make stack` (and `make test`) fetch the broker's jars from Maven
Central with `mvn` into `.cache/kafka/libs/` (`cdpflow/stack/kafka-pom.xml`), or
`CDPFLOW_KAFKA_LIBS` names another folder of them. `cdpflow stack up kafka` writes
`.stack/kafka/server.properties` and `log4j2.properties`, formats the storage under
`.stack/kafka/data/` the first time (`kafka.tools.StorageTool format --standalone`, with a
cluster id derived from the folder, so it is the same at every start), starts
`java ... kafka.Kafka server.properties` as a process of its own, records its pid, and creates
the project's topics (`cdpflow.schemas.topics.TOPICS`) that are missing. The broker's log
(log4j2 to its standard output, together with anything the JVM itself says) goes to
`.stack/kafka/kafka.log`.

Clients use `Kafka(...).bootstrap_servers()`, `127.0.0.1:9092` unless `CDPFLOW_STACK_KAFKA_PORT`
says otherwise; the controller listens on 9093 (`CDPFLOW_STACK_KAFKA_CONTROLLER_PORT`). One
broker: every replication factor is 1.
"""
from __future__ import annotations

import base64
import logging
import os
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import kafka.errors
from kafka import KafkaAdminClient

from cdpflow.errors import BadInput
from cdpflow.schemas.topics import TOPICS
from cdpflow.stack.base import HOST, ProcessComponent, StackError, env_port, project_root

DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
DEFAULT_PARTITIONS = 2
PORT_VARIABLE = "CDPFLOW_STACK_KAFKA_PORT"
CONTROLLER_PORT_VARIABLE = "CDPFLOW_STACK_KAFKA_CONTROLLER_PORT"
PARTITIONS_VARIABLE = "CDPFLOW_STACK_KAFKA_PARTITIONS"
LIBS_VARIABLE = "CDPFLOW_KAFKA_LIBS"
# Small enough to sit beside Redis and a Flink cluster on a 2-core, 24 GiB machine; the broker
# measured 470-650 MiB resident under load.
HEAP = ("-Xmx512m", "-Xms256m")
MAIN_CLASS = "kafka.Kafka"
# How long one health check may take: `status` asks every component, and a broker that hangs
# (stopped, swapping) must read as unhealthy within about a second.
CHECK_TIMEOUT_MS = 1000

log = logging.getLogger(__name__)


def libs_dir() -> Path:
    """The folder of the broker's jars: `CDPFLOW_KAFKA_LIBS`, or `.cache/kafka/libs/` at the project root."""
    configured = os.environ.get(LIBS_VARIABLE)
    return Path(configured).resolve() if configured else project_root() / ".cache" / "kafka" / "libs"


def env_partitions(default: int = DEFAULT_PARTITIONS) -> int:
    """The partitions of each topic: `CDPFLOW_STACK_KAFKA_PARTITIONS`, or the default."""
    value = os.environ.get(PARTITIONS_VARIABLE, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise BadInput(f"{PARTITIONS_VARIABLE}={value!r} is not a number of partitions (1 or more)")
    return int(value)


class Kafka(ProcessComponent):
    """The Kafka broker of the stack (the event log: raw events in, changes out), KRaft, one node."""

    name = "kafka"
    program = "java"
    start_timeout = 60.0
    port_variables = {"clients": PORT_VARIABLE, "controller": CONTROLLER_PORT_VARIABLE}

    def __init__(self, root: Path, port: Optional[int] = None, controller_port: Optional[int] = None,
                 partitions: Optional[int] = None, libs: Optional[Path] = None):
        super().__init__(root)
        self.port = env_port(PORT_VARIABLE, DEFAULT_PORT) if port is None else port
        self.controller_port = (env_port(CONTROLLER_PORT_VARIABLE, DEFAULT_CONTROLLER_PORT)
                                if controller_port is None else controller_port)
        self.partitions = env_partitions() if partitions is None else partitions
        if self.partitions < 1:
            raise BadInput(f"a topic needs 1 partition or more, not {self.partitions}")
        self.libs = libs_dir() if libs is None else Path(libs).resolve()

    @property
    def ports(self) -> Dict[str, int]:
        return {"clients": self.port, "controller": self.controller_port}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def bootstrap_servers(self) -> str:
        """What a client's `bootstrap_servers` is set to, e.g. `127.0.0.1:9092`."""
        return self.address

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def properties(self) -> Path:
        return self.folder / "server.properties"

    def cluster_id(self) -> str:
        """The KRaft cluster id: derived from the folder, so formatting it again would give the same."""
        attempt = 0
        while True:
            digest = uuid.uuid5(uuid.NAMESPACE_URL, f"{self.folder.as_uri()}#{attempt}").bytes
            found = base64.urlsafe_b64encode(digest).decode().rstrip("=")
            # An id that starts with '-' reads as an option on StorageTool's command line (Kafka's
            # own random ids skip those too): one in 64 folders takes the next candidate.
            if not found.startswith("-"):
                return found
            attempt += 1

    def config(self) -> str:
        """The text of server.properties, written anew at each start so changed ports take effect."""
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers={HOST}:{self.controller_port}",
            f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={self.data}",
            f"num.partitions={self.partitions}",
            # One broker: the internal topics cannot have more replicas than that, and with the
            # defaults (3) transactions and read_committed consumers hang.
            "default.replication.factor=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            # The project's topics are created by `up` with their own configuration; a misspelt
            # name in a producer fails instead of making a topic of its own.
            "auto.create.topics.enable=false",
            # A consumer group starts at once rather than after the default 3 s wait for more members.
            "group.initial.rebalance.delay.ms=0",
            "",
        ])

    def log4j_config(self) -> str:
        # To standard output, which `_launch` sends to kafka.log with whatever the JVM says itself
        # (a refused option, an out-of-memory error): one file, one writer. The request and
        # state-change loggers are chatty at INFO.
        return "\n".join([
            "status = warn",
            "appender.out.type = Console",
            "appender.out.name = out",
            "appender.out.layout.type = PatternLayout",
            "appender.out.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = INFO",
            "rootLogger.appenderRef.out.ref = out",
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "logger.state.name = state.change.logger",
            "logger.state.level = WARN",
            "logger.network.name = kafka.network.RequestChannel$",
            "logger.network.level = WARN",
            # Each client and server config is dumped whole at INFO: thousands of lines a start.
            "logger.config.name = org.apache.kafka.common.config.AbstractConfig",
            "logger.config.level = WARN",
            "",
        ])

    def up(self, timeout: Optional[float] = None) -> bool:
        """Starts the broker unless it runs, then creates the project's topics that are missing."""
        if self.pid() is None and not any(self.libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"Kafka's jars are not in {self.libs}: run `make stack` (or `make test`), "
                             f"which fetches them with mvn")
        started = super().up(timeout)
        self.ensure_topics()
        return started

    def ensure_topics(self) -> List[str]:
        """Creates each topic of `TOPICS` that does not exist; existing ones keep their partitions
        but get the configuration `TOPICS` declares where theirs differs (a stack made by an older
        cdpflow: e.g. the destinations' dead letters became compacted, so a forget can purge them).

        Returns:
            The names of the topics created now.
        Raises:
            StackError: the broker refused one.
        """
        with self._admin(timeout_ms=30_000) as admin:
            existing = set(admin.list_topics())
            self._align_configs(admin, [topic for topic in TOPICS if topic.name in existing])
            missing = {topic.name: {"num_partitions": self.partitions, "replication_factor": 1,
                                    "configs": dict(topic.configs)}
                       for topic in TOPICS if topic.name not in existing}
            if not missing:
                return []
            response = admin.create_topics(missing, raise_errors=False)
            refused = [f"{topic['name']}: {kafka.errors.for_code(topic['error_code']).__name__} "
                       f"{topic.get('error_message') or ''}".strip()
                       for topic in response["topics"]
                       # Created meanwhile by another `up`: what idempotence wants.
                       if topic["error_code"] not in (0, kafka.errors.TopicAlreadyExistsError.errno)]
            if refused:
                raise StackError("kafka refused to create topic(s): " + "; ".join(refused))
            # Producers may write as soon as `up` returns: wait until each partition has its leader.
            admin.wait_for_topics(list(missing))
        return sorted(missing)

    @staticmethod
    def _align_configs(admin: KafkaAdminClient, topics) -> None:
        from kafka.admin import ConfigResource, ConfigResourceType
        if not topics:
            return
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.name) for t in topics],
                                       config_filter="all")["topic"]
        stale = [ConfigResource(ConfigResourceType.TOPIC, t.name, configs=dict(t.configs)) for t in topics
                 if any((found.get(t.name, {}).get(k) or {}).get("value") != v for k, v in t.configs.items())]
        if stale:
            admin.alter_configs(stale)

    def _admin(self, timeout_ms: int) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.bootstrap_servers(), client_id="cdpflow-stack",
                                bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms)

    def _java(self, executable: str, main_class: str, *arguments: str) -> List[str]:
        return [executable, *HEAP, "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.folder / 'log4j2.properties'}",
                # Java expands `DIR/*` to the jars in DIR itself (no shell involved).
                "-cp", str(self.libs / "*"), main_class, *arguments]

    def _launch(self, executable: str) -> None:
        self.properties.write_text(self.config())
        (self.folder / "log4j2.properties").write_text(self.log4j_config())
        if not (self.data / "meta.properties").exists():
            # Once per data folder: a formatted folder is never formatted again (that would refuse,
            # or with --ignore-formatted hide a changed cluster id).
            done = subprocess.run(self._java(executable, "kafka.tools.StorageTool", "format", "--standalone",
                                             "-t", self.cluster_id(), "-c", str(self.properties)),
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise StackError(f"kafka's storage could not be formatted (exit {done.returncode}): "
                                 f"{(done.stdout + done.stderr).strip()}")
        with open(self.logfile, "ab") as out:
            # A session of its own, so a Ctrl-C in the terminal that ran `stack up` does not reach it.
            process = subprocess.Popen(self._java(executable, MAIN_CLASS, str(self.properties)), cwd=self.folder,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        # The JVM writes no pidfile of its own: the stack records the process it started.
        self.pidfile.write_text(f"{process.pid}\n")

    def _is_ours(self, cmdline: bytes) -> bool:
        # Any JVM is `java`: only a broker started on this folder's configuration is this component.
        return MAIN_CLASS.encode() in cmdline and str(self.properties).encode() in cmdline

    def _answers(self) -> bool:
        # An open port first: while the JVM starts, a refused connection answers at once, where the
        # client would retry until its timeout.
        try:
            socket.create_connection((HOST, self.port), timeout=CHECK_TIMEOUT_MS / 1000).close()
        except OSError:
            return False
        # Then a metadata request, the one every client makes first. The client logs a broker that
        # does not answer as errors of its own; here that is the answer, said by `status`.
        client_log = logging.getLogger("kafka")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            with self._admin(timeout_ms=CHECK_TIMEOUT_MS) as admin:
                admin.list_topics()
        except (kafka.errors.KafkaError, OSError) as err:
            log.debug("kafka on %s does not answer: %s", self.address, err)
            return False
        finally:
            client_log.setLevel(level)
        return True
