"""Bind a rank graph to its process groups: moefx's logical collectives become torch's functional ones.

A partitioned graph names its groups logically ("tp", "ep4", "ep8_inter", see `moefx.parallel`),
so it prints, dumps and diffs without a live process group. `bind_collectives(gm, groups)` is the
lowering for one job's mesh: every moefx collective node becomes what torch's compiler knows,

    all_to_all(x, o, i, "ep4")      ->  t = _c10d_functional.all_to_all_single(x, o, i, pg); wait_tensor(t)
    all_to_all_start(x, o, i, g); wait(t)
                                    ->  bound_collectives.all_to_all_start / all_to_all_wait (torch's
                                        all_to_all_single / wait_tensor inside; the backward's issue and
                                        wait are split the same way, see there)
    all_gather_rows(x, g, n)        ->  t = _c10d_functional.all_gather_into_tensor(x, n, pg); wait_tensor(t)
    tp_copy / tp_reduce / tp_split / tp_gather
                                    ->  moefx.nn.bound_collectives' functions of the same names

with `pg` the live group's c10d name and each issue and its wait separate nodes, so Inductor's
communication passes (reordering, bucketing, overlap) see them. The expert all-to-alls get torch's
autograd formulas (the reverse all-to-all); the TP ops keep Megatron's (see bound_collectives).
The result names no moefx group: it runs on exactly these groups whatever is bound by name later
(a distillation teacher's mesh cannot capture a student's collectives).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import fx

from .. import meta as M
from ..nn import bound_collectives as B
from ..nn import collectives as C
from .base import verify
from .graph import copy_graph_module

__all__ = ["bind_collectives", "collective_name"]

NAME = "bind_collectives"
_F = torch.ops._c10d_functional
_TP = {C.TP_COPY: B.tp_copy, C.TP_REDUCE: B.tp_reduce, C.TP_SPLIT: B.tp_split, C.TP_GATHER: B.tp_gather}


def bind_collectives(gm: fx.GraphModule, groups: Mapping[str, "dist.ProcessGroup"]) -> fx.GraphModule:
    """A copy of `gm` whose collectives run on `groups` (moefx group name -> ProcessGroup of this rank)
    through torch's functional collectives; `gm` is unchanged. GroupNotBound when the graph names a
    group `groups` lacks or expects a group of another size."""
    new = copy_graph_module(gm)
    graph = new.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in C.OPS:
            continue
        with graph.inserting_before(n):
            out = _lower(graph, n, groups)
        n.replace_all_uses_with(out)
        graph.erase_node(n)
    for n in list(graph.nodes):          # each issued all-to-all's wait waits for it the bound way
        src = n.args[0] if n.target is C.WAIT else None
        if isinstance(src, fx.Node) and src.target is B.all_to_all_start:
            n.target, n.args = B.all_to_all_wait, (src, *src.args[1:])
            M.tag(n, NAME, "collective", n.meta.get(M.LAYER), n.meta.get(M.BLOCK))
    new.recompile()
    verify(new)
    left = [n.name for n in new.graph.nodes if n.target in C.OPS]
    if left:
        raise AssertionError(f"bind_collectives left moefx collectives unbound: {left}")
    return new


def collective_name(target) -> str:
    """The moefx collective a logical op performs ("all_to_all" for both halves of an issued one)."""
    name = str(target).split(".")[1]
    return "all_to_all" if name == "all_to_all_start" else name


def _group(groups, name: str, size: int | None = None):
    pg = groups.get(name)
    if pg is None:
        raise C.GroupNotBound(f"the rank graph runs a collective over the process group {name!r}, which this "
                              f"job's mesh does not have (groups: {sorted(groups)}): build the mesh for this plan")
    if size is not None and dist.get_world_size(pg) != size:
        raise C.GroupNotBound(f"the graph expects group {name!r} to have {size} ranks, but the mesh's group has "
                              f"{dist.get_world_size(pg)}: the rank graph was built for another parallel plan")
    return pg


def _lower(graph: fx.Graph, n: fx.Node, groups) -> fx.Node:
    """The nodes that replace collective `n` (inserted at the graph's insert point); returns the result."""
    op = n.target
    layer, block = n.meta.get(M.LAYER), n.meta.get(M.BLOCK)

    def node(target, *args, role="collective", issue=False):
        out = graph.call_function(target, args)
        if issue:                                   # the node that moves the data carries the original facts
            out.meta.update(n.meta)
        M.tag(out, NAME, role, layer, block)
        if issue:
            out.meta[M.COLLECTIVE] = collective_name(op)
        return out

    if op in (C.ALL_TO_ALL, C.ALL_TO_ALL_START):
        x, out_splits, in_splits, name = n.args
        pg = _group(groups, name)
        if dist.get_world_size(pg) == 1:
            return node(torch.ops.aten.clone.default, x, issue=True)
        if op is C.ALL_TO_ALL_START:
            return node(B.all_to_all_start, x, out_splits, in_splits, pg.group_name, issue=True)
        x = node(torch.Tensor.contiguous, x, role="layout")
        t = node(_F.all_to_all_single.default, x, out_splits, in_splits, pg.group_name, issue=True)
        return node(_F.wait_tensor.default, t)
    if op is C.ALL_GATHER_ROWS:
        x, name, size = n.args
        pg = _group(groups, name, size)
        if size == 1:
            return node(torch.ops.aten.clone.default, x, issue=True)
        x = node(torch.Tensor.contiguous, x, role="layout")
        t = node(_F.all_gather_into_tensor.default, x, size, pg.group_name, issue=True)
        return node(_F.wait_tensor.default, t)
    if op in _TP:
        x, *rest = n.args
        if op in (C.TP_COPY, C.TP_REDUCE):
            (name,) = rest
            return node(_TP[op], x, _group(groups, name).group_name, issue=True)
        dim, name, size, *full = rest
        pg = _group(groups, name, size)
        return node(_TP[op], x, dim, pg.group_name, size, *full, dist.get_rank(pg), issue=True)
    raise AssertionError(f"{n.name}: {op} belongs in no forward graph (it is a backward op)")
