"""A simulated multi-node cluster on one host, for benchmarks (not a test): network namespaces
joined by a bridge whose ports carry a token-bucket rate limit.

    with Cluster(nodes=2, rate="1gbit") as c:
        c.spawn(node, [sys.executable, "script.py", ...], env)    # a process "on" node `node`
        c.addr(0)                                                  # node 0's address (the master)

Node n is the namespace `mfx<n>` with address 10.77.0.<n+1>/24 on interface `mfxc<n>`; the host end
of its veth pair (`mfxh<n>`) sits on the bridge `mfxbr`. Both ends shape their egress with
`tc qdisc ... tbf rate <rate>`, so traffic between two nodes crosses two rate-limited links,
while ranks inside one namespace talk over its loopback at memory speed, as the devices of one
machine do. Needs root (CAP_NET_ADMIN) and the `ip` and `tc` tools; everything it creates is
removed on exit, and names already present are an error, never reused.
"""
from __future__ import annotations

import os
import subprocess

BRIDGE = "mfxbr"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Cluster:
    """`nodes` namespaces on a rate-limited bridge (see the module docstring)."""

    def __init__(self, nodes: int, rate: str = "1gbit", burst: str = "256kb", latency: str = "100ms"):
        self.nodes, self.rate, self.burst, self.latency = nodes, rate, burst, latency
        self.procs: list[subprocess.Popen] = []

    def addr(self, node: int) -> str:
        return f"10.77.0.{node + 1}"

    def ifname(self, node: int) -> str:
        return f"mfxc{node}"

    def __enter__(self) -> "Cluster":
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        if any(line.split()[0].startswith("mfx") for line in existing.splitlines() if line.strip()):
            raise RuntimeError("namespaces named mfx* exist already (a run that did not clean up?): "
                               "remove them with `ip netns del` first")
        try:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
            _sh("ip", "link", "set", BRIDGE, "up")
            for n in range(self.nodes):
                ns, host, inner = f"mfx{n}", f"mfxh{n}", self.ifname(n)
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
                _sh("ip", "link", "set", inner, "netns", ns)
                _sh("ip", "link", "set", host, "master", BRIDGE)
                _sh("ip", "link", "set", host, "up")
                _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addr(n)}/24", "dev", inner)
                _sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
                _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                shape = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]
                _sh("tc", "qdisc", "add", "dev", host, *shape)
                _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, *shape)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def spawn(self, node: int, argv: list[str], env: dict) -> subprocess.Popen:
        """Start argv inside node `node`'s namespace with `env` added to this environment."""
        proc = subprocess.Popen(["ip", "netns", "exec", f"mfx{node}", *argv],
                                env={**os.environ, **env, "GLOO_SOCKET_IFNAME": self.ifname(node)})
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for n in range(self.nodes):
            subprocess.run(["ip", "link", "del", f"mfxh{n}"], capture_output=True)   # both ends, now
            subprocess.run(["ip", "netns", "del", f"mfx{n}"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
