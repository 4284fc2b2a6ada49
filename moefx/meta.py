"""The node.meta keys moefx reads and writes, defined once (what a pass records about the whole
graph is `moefx.facts`).

BLOCK  int     index of the Transformer block a node belongs to (set by analysis)
ROLE   str     one of ROLES (set by analysis and by the passes that create nodes)
PASS   str     name of the pass that created the node
LAYER  int     MoE layer index (0-based, in block order)
GROUP  str     process-group name of a collective (set by partition)
IMPL   str     implementation a gating node runs with ("torch" / "triton"), set by lower_gating
A2A    str     "counts" / "dispatch" / "combine": the step of an expert all-to-all a collective is
PATH   str     how an MoE layer runs its experts ("buffer" / "gather"), on its experts node
COLLECTIVE str the moefx collective a bound node performs ("all_to_all", "tp_reduce", ...; set by
               bind_collectives on the node that moves the data, not on its wait)
"""

BLOCK = "moefx_block"
ROLE = "moefx_role"
PASS = "moefx_pass"
LAYER = "moefx_layer"
GROUP = "moefx_group"
IMPL = "moefx_impl"
A2A = "moefx_a2a"
PATH = "moefx_experts_path"
COLLECTIVE = "moefx_collective"

ROLES = ("attn", "ffn", "router", "route", "dispatch", "experts", "combine", "residual", "coef", "mix",
         "collective", "aux", "layout")
# Roles of nodes a pass creates (the others annotate nodes that came from the captured model).
CREATED_ROLES = ("router", "route", "dispatch", "experts", "combine", "coef", "mix", "collective", "aux",
                 "layout")


def tag(node, pass_name: str, role: str | None = None, layer: int | None = None, block: int | None = None):
    """Record provenance on a node created by a pass; returns the node."""
    node.meta[PASS] = pass_name
    if role is not None:
        node.meta[ROLE] = role
    if layer is not None:
        node.meta[LAYER] = layer
    if block is not None:
        node.meta[BLOCK] = block
    return node
