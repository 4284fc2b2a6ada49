"""Graph-editing helpers the passes share: copy a GraphModule, insert tagged nodes."""
from __future__ import annotations

from torch import fx

from .. import meta as M
from ..capture import mark_captured
from ..tensors import owner_of


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of gm's graph (same node names, parameters shared)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen  # in/out pytree specs: read-only, safe to share
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, child in gm.named_children():
        if getattr(child, "_moefx_keep", False):  # keep moefx containers whole, not rebuilt as plain Modules
            new.add_submodule(name, child)
    new.meta = dict(getattr(gm, "meta", {}))
    for hook in gm._forward_pre_hooks.values():   # capture's input device check
        new.register_forward_pre_hook(hook)
    for name, value in vars(gm).items():
        if name.startswith("_moefx"):
            setattr(new, name, value)
    return mark_captured(new)


class NodeBuilder:
    """Inserts nodes one after another (starting after `after`), tagging each with provenance."""

    def __init__(self, graph: fx.Graph, after: fx.Node, pass_name: str, layer: int | None = None,
                 block: int | None = None):
        self.graph, self.cursor, self.pass_name, self.layer, self.block = graph, after, pass_name, layer, block
        self.created: list[fx.Node] = []

    def __call__(self, op: str, target, args, kwargs=None, role: str | None = None, group: str | None = None
                 ) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.create_node(op, target, tuple(args), kwargs or {})
        self.cursor = node
        self.created.append(node)
        M.tag(node, self.pass_name, role, self.layer, self.block)
        if group is not None:
            node.meta[M.GROUP] = group
        return node

    def fn(self, target, *args, role: str | None = None, group: str | None = None, **kwargs) -> fx.Node:
        """A call_function node: `b.fn(torch.ops.aten.add.Tensor, x, y, role="mix")`."""
        return self(("call_function"), target, args, kwargs, role=role, group=group)


def drop_unused_attributes(gm: fx.GraphModule) -> list[str]:
    """Delete every parameter / buffer no node reads any more (no get_attr of it, not inside a module a
    call_module node runs), so the module holds only what its graph uses. Returns the deleted names.

    Tied tensors are handled by name: an alias nobody reads is deleted, the tensor stays reachable
    through the alias the graph reads."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    running = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    dropped = []
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + \
        [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used or name.startswith(running):
            continue
        owner, attr = owner_of(gm, name)
        for store in (owner._parameters, owner._buffers):
            if attr in store:
                del store[attr]
                dropped.append(name)
    return dropped
