"""Alpha-beta cost model: flat vs hierarchical all-to-all (DeepSpeed-MoE, "hierarchical a2a").

p = N * G ranks (N nodes, G devices per node); every rank sends V bytes in total, spread evenly
over the p destinations. One message costs alpha (latency); bytes move at beta_intra inside a node
and beta_inter across nodes (bytes / s per device); a layout transform copies V bytes at beta_mem.

    flat         T = (p - 1) alpha + V (G - 1) / (p beta_intra) + V (p - G) / (p beta_inter)
    hierarchical T = (G - 1 + N - 1) alpha + V (G - 1) / (G beta_intra) + V (N - 1) / (N beta_inter)
                     + 2 V / beta_mem

Hierarchical saves (G - 1)(N - 1) messages (O(p) -> O(G + p/G) hops) and sends the same
inter-node volume, but moves most data twice (intra-node, then inter-node: up to 2x volume) and
adds two layout copies. So it wins for small messages on many nodes, never on one node (or one
device per node), and loses for large messages. `a2a_cost_exprs()` gives the formulas as sympy
expressions (for docs); `crossover_bytes` the V below which hierarchical is faster.

The constants below describe a GPU cluster (NVLink inside nodes, 100 Gb/s between them). A
`CostProfile` holds the same quantities *measured* on the groups a job really has (`moefx
calibrate`, `moefx.runtime.calibrate`), plus the fixed cost of one collective call (`launch`,
which dominates on loopback and small messages: hierarchical makes two calls and two layout
copies where flat makes one); the hierarchical_a2a pass decides with the profile when there is one.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ALPHA", "BETA_INTRA", "BETA_INTER", "BETA_MEM", "flat_a2a_time", "hierarchical_a2a_time",
           "choose_hierarchical", "crossover_bytes", "a2a_cost_exprs", "CostProfile"]

ALPHA = 10e-6        # s per message (inter-node launch + network latency)
BETA_INTRA = 150e9   # bytes / s per device inside a node (NVLink class)
BETA_INTER = 12.5e9  # bytes / s per device across nodes (100 Gb/s class)
BETA_MEM = 1e12      # bytes / s of a device-memory copy (layout transform)


def _check(bytes_per_rank: float, nodes: int, devices_per_node: int) -> None:
    if bytes_per_rank < 0 or nodes < 1 or devices_per_node < 1:
        raise ValueError(f"cost model needs bytes_per_rank >= 0, nodes >= 1, devices_per_node >= 1; got "
                         f"{bytes_per_rank}, {nodes}, {devices_per_node}")


def flat_a2a_time(bytes_per_rank: float, nodes: int, devices_per_node: int, alpha: float = ALPHA,
                  beta_intra: float = BETA_INTRA, beta_inter: float = BETA_INTER) -> float:
    """Seconds for one flat all-to-all where each rank sends `bytes_per_rank` bytes in total."""
    _check(bytes_per_rank, nodes, devices_per_node)
    N, G, V = nodes, devices_per_node, float(bytes_per_rank)
    p = N * G
    return (p - 1) * alpha + V * (G - 1) / (p * beta_intra) + V * (p - G) / (p * beta_inter)


def hierarchical_a2a_time(bytes_per_rank: float, nodes: int, devices_per_node: int, alpha: float = ALPHA,
                          beta_intra: float = BETA_INTRA, beta_inter: float = BETA_INTER,
                          beta_mem: float = BETA_MEM) -> float:
    """Seconds for one hierarchical all-to-all (two layout copies, intra-node then inter-node a2a)."""
    _check(bytes_per_rank, nodes, devices_per_node)
    N, G, V = nodes, devices_per_node, float(bytes_per_rank)
    return ((G - 1 + N - 1) * alpha + V * (G - 1) / (G * beta_intra) + V * (N - 1) / (N * beta_inter)
            + 2 * V / beta_mem)


def choose_hierarchical(bytes_per_rank: float, nodes: int, devices_per_node: int, alpha: float = ALPHA,
                        beta_intra: float = BETA_INTRA, beta_inter: float = BETA_INTER,
                        beta_mem: float = BETA_MEM) -> bool:
    """True when the hierarchical all-to-all is predicted faster than the flat one.

    Always False on one node or with one device per node (nothing to save).
    """
    _check(bytes_per_rank, nodes, devices_per_node)
    if nodes == 1 or devices_per_node == 1:
        return False
    flat = flat_a2a_time(bytes_per_rank, nodes, devices_per_node, alpha, beta_intra, beta_inter)
    hier = hierarchical_a2a_time(bytes_per_rank, nodes, devices_per_node, alpha, beta_intra, beta_inter, beta_mem)
    return hier < flat


def crossover_bytes(nodes: int, devices_per_node: int, alpha: float = ALPHA, beta_intra: float = BETA_INTRA,
                    beta_inter: float = BETA_INTER, beta_mem: float = BETA_MEM) -> float:
    """Bytes per rank below which hierarchical wins (0.0 when it never does)."""
    N, G = nodes, devices_per_node
    if N == 1 or G == 1:
        return 0.0
    p = N * G
    saved = (G - 1) * (N - 1) * alpha
    # hierarchical minus flat, per byte (the inter-node terms are equal and cancel)
    extra = (G - 1) * (1 / G - 1 / p) / beta_intra + 2 / beta_mem
    return saved / extra


def a2a_cost_exprs():
    """(T_flat, T_hier, symbols) as sympy expressions in N, G, V, alpha, beta_intra, beta_inter, beta_mem."""
    import sympy as sp

    N, G, V, a, bi, be, bm = sp.symbols("N G V alpha beta_intra beta_inter beta_mem", positive=True)
    p = N * G
    t_flat = (p - 1) * a + V * (G - 1) / (p * bi) + V * (p - G) / (p * be)
    t_hier = (G - 1 + N - 1) * a + V * (G - 1) / (G * bi) + V * (N - 1) / (N * be) + 2 * V / bm
    syms = {"N": N, "G": G, "V": V, "alpha": a, "beta_intra": bi, "beta_inter": be, "beta_mem": bm}
    return t_flat, t_hier, syms


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

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON (atomically)."""
        from .fileio import write_atomic

        write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CostProfile":
        """Read a profile written by `save` / `moefx calibrate`."""
        from .errors import PlanError

        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise PlanError(f"cannot read the cost profile {str(path)!r} ({type(e).__name__}: {e}); write one "
                            "with `moefx calibrate`") from None
