"""What a rank graph's collectives move: bytes per MoE layer and step, measured on a real run.

`collective_bytes(local, *inputs)` runs the graph once, node by node (`torch.fx.Interpreter`,
eagerly, under no_grad), and records for every collective node the bytes of the tensor it hands
to the collective: an expert all-to-all's input is exactly the rows this rank sends (those for
itself included), the count all-gather its per-expert counts. Logical (`partitioned_view`) and
bound (`moefx.distribute`) graphs both work: a bound node names its collective in node.meta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .. import meta as M
from ..nn.collectives import OPS
from ..passes.bind_collectives import collective_name

__all__ = ["CollectiveRecord", "collective_bytes", "bytes_by_layer"]


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call of a forward: node name, op, group, MoE layer (None: TP), step, bytes sent."""

    node: str
    op: str
    group: str | None
    layer: int | None
    step: str | None
    bytes: int


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.records: list[CollectiveRecord] = []

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        op = n.meta.get(M.COLLECTIVE) or (collective_name(n.target) if n.target in OPS else None)
        if n.op == "call_function" and op is not None:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            size = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
            self.records.append(CollectiveRecord(n.name, op, n.meta.get(M.GROUP),
                                                 n.meta.get(M.LAYER), n.meta.get(M.A2A), int(size)))
        return out


def collective_bytes(local: fx.GraphModule, *inputs) -> list[CollectiveRecord]:
    """Run `local(*inputs)` once, eagerly, and return every collective call with the bytes it sent."""
    rec = _Recorder(local)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.records


def bytes_by_layer(records: list[CollectiveRecord], step: str = "dispatch") -> dict[int, int]:
    """MoE layer -> bytes this rank handed to its `step` all-to-alls (all steps of a hierarchical one:
    the first step's bytes, which are the rows sent)."""
    out: dict[int, int] = {}
    seen: set[int] = set()
    for r in records:
        if r.layer is None or r.step != step or r.op != "all_to_all":
            continue
        if r.layer in seen:            # a hierarchical dispatch: its later steps move the same rows again
            continue
        seen.add(r.layer)
        out[r.layer] = r.bytes
    return out
