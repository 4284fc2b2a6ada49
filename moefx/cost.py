"""Alpha-beta cost model: flat vs hierarchical all-to-all (DeepSpeed-MoE, "hierarchical a2a").

p = N * G ranks (N nodes, G devices per node); every rank sends V bytes in total, spread evenly
over the p destinations. One message costs alpha (latency); bytes move at beta_intra inside a node
and beta_inter across nodes (bytes / s per device); a layout transform copies V bytes at beta_mem.

    flat         T = launch + (G - 1) alpha_intra + (p - G) alpha_inter
                     + V (G - 1) / (p beta_intra) + V (p - G) / (p beta_inter)
    hierarchical T = 2 launch + (G - 1) alpha_intra + (N - 1) alpha_inter
                     + V (G - 1) / (G beta_intra) + V (N - 1) / (N beta_inter) + 2 V / beta_mem

Hierarchical saves (G - 1)(N - 1) messages (O(p) -> O(G + p/G) hops) and sends the same
inter-node volume, but moves most data twice (intra-node, then inter-node: up to 2x volume) and
adds two layout copies. So it wins for small messages on many nodes, never on one node (or one
device per node), and loses for large messages.

A `CostProfile` holds these quantities. Its defaults describe a GPU cluster (NVLink inside nodes,
100 Gb/s between them, no fixed cost per call); `moefx calibrate` (`moefx.runtime.calibrate`)
measures them on the groups a job really has, including the fixed cost of one collective call
(`launch`, which dominates on loopback and small messages: hierarchical makes two calls and two
layout copies where flat makes one). The hierarchical_a2a pass decides with the job's profile, or
the defaults when it has none.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PlanError
from .fileio import write_atomic

__all__ = ["ALPHA", "BETA_INTRA", "BETA_INTER", "BETA_MEM", "PLAUSIBLE_MAX", "NO_PEERS", "CostProfile"]

ALPHA = 10e-6        # s per message (inter-node launch + network latency)
BETA_INTRA = 150e9   # bytes / s per device inside a node (NVLink class)
BETA_INTER = 12.5e9  # bytes / s per device across nodes (100 Gb/s class)
BETA_MEM = 1e12      # bytes / s of a device-memory copy (layout transform)
PLAUSIBLE_MAX = 20e12  # bytes / s: above any HBM or interconnect today; a fit beyond it is noise
NO_PEERS = 1e15        # the bandwidth a profile records for a level with no peers (one node, one device)


def _check(bytes_per_rank: float, nodes: int, devices_per_node: int) -> None:
    if bytes_per_rank < 0 or nodes < 1 or devices_per_node < 1:
        raise ValueError(f"cost model needs bytes_per_rank >= 0, nodes >= 1, devices_per_node >= 1; got "
                         f"{bytes_per_rank}, {nodes}, {devices_per_node}")


@dataclass(frozen=True)
class CostProfile:
    """Measured costs of one machine's groups (seconds, bytes per second per device).

    launch: fixed cost of one all-to-all call; alpha_intra / alpha_inter: cost per peer message
    inside / across nodes; beta_intra / beta_inter: bandwidth inside / across nodes; beta_mem: a
    local copy (layout transform); source: where the numbers come from (for reports).
    """

    launch: float = 0.0
    alpha_intra: float = ALPHA
    alpha_inter: float = ALPHA
    beta_intra: float = BETA_INTRA
    beta_inter: float = BETA_INTER
    beta_mem: float = BETA_MEM
    source: str = "defaults (GPU cluster constants)"

    def flat_time(self, bytes_per_rank: float, nodes: int, devices_per_node: int) -> float:
        """Seconds of one flat all-to-all over nodes x devices_per_node ranks."""
        _check(bytes_per_rank, nodes, devices_per_node)
        N, G, V = nodes, devices_per_node, float(bytes_per_rank)
        p = N * G
        return (self.launch + (G - 1) * self.alpha_intra + (p - G) * self.alpha_inter
                + V * (G - 1) / (p * self.beta_intra) + V * (p - G) / (p * self.beta_inter))

    def hierarchical_time(self, bytes_per_rank: float, nodes: int, devices_per_node: int) -> float:
        """Seconds of one hierarchical all-to-all (two calls, two layout copies)."""
        _check(bytes_per_rank, nodes, devices_per_node)
        N, G, V = nodes, devices_per_node, float(bytes_per_rank)
        return (2 * self.launch + (G - 1) * self.alpha_intra + (N - 1) * self.alpha_inter
                + V * (G - 1) / (G * self.beta_intra) + V * (N - 1) / (N * self.beta_inter) + 2 * V / self.beta_mem)

    def choose_hierarchical(self, bytes_per_rank: float, nodes: int, devices_per_node: int) -> bool:
        """True when the hierarchical all-to-all is predicted faster (never on one node or one device per node)."""
        if nodes == 1 or devices_per_node == 1:
            return False
        return self.hierarchical_time(bytes_per_rank, nodes, devices_per_node) < \
            self.flat_time(bytes_per_rank, nodes, devices_per_node)

    def describe(self) -> str:
        """The profile with units, and a note on every bandwidth no machine reaches (a fit on timer
        noise: the large message took no measurably longer than the small one)."""
        def rate(v: float) -> str:
            return "n/a (no such peers)" if v >= NO_PEERS else f"{v / 1e9:.3g} GB/s"

        parts = [f"launch {self.launch * 1e6:.3g} us/call", f"alpha_intra {self.alpha_intra * 1e6:.3g} us/message",
                 f"alpha_inter {self.alpha_inter * 1e6:.3g} us/message", f"beta_intra {rate(self.beta_intra)}",
                 f"beta_inter {rate(self.beta_inter)}", f"beta_mem {rate(self.beta_mem)}"]
        text = ", ".join(parts) + f" ({self.source})"
        odd = self.implausible()
        if odd:
            text += (f"\nimplausible: {', '.join(odd)} above {PLAUSIBLE_MAX / 1e12:.0f} TB/s, faster than any "
                     "interconnect or memory: the large message was not measurably slower than the small one "
                     "(timer noise); measure again with more --reps")
        return text

    def implausible(self) -> list[str]:
        """Names of the bandwidths above PLAUSIBLE_MAX (see `describe`)."""
        return [name for name in ("beta_intra", "beta_inter", "beta_mem")
                if PLAUSIBLE_MAX < getattr(self, name) < NO_PEERS]

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (atomically)."""
        write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        """Read a profile written by `save` / `moefx calibrate`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise PlanError(f"cannot read the cost profile {str(path)!r} ({type(e).__name__}: {e}); write one "
                            "with `moefx calibrate`") from None
