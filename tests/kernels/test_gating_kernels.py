"""Triton gating kernels (moefx.kernels.gating, through the custom ops of moefx.nn.gating_ops)
against their PyTorch references (moefx.nn.table).

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set for this
module only (moefx reads it at launch time, so it does not leak into other tests). Sizes are
small because every interpreted program costs milliseconds. With CUDA the same tests run the
compiled kernels on the GPU. Every test that asks for the Triton path also checks that Triton
kernels were launched (`moefx.kernels.gating.LAUNCHES`), so a silent fall back to the reference
cannot pass.
"""
from __future__ import annotations

import os

import pytest
import torch

from moefx.kernels import gating as K  # noqa: E402
from moefx.nn import gating_ops as G  # noqa: E402
from moefx.nn import table as R  # noqa: E402
from moefx.nn.routing import combine, dispatch, route  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    """The interpreter on CPU, compiled kernels on CUDA, for this module's tests only."""
    outer = os.environ.get("TRITON_INTERPRET")
    with pytest.MonkeyPatch.context() as mp:
        if DEV == "cuda":
            mp.delenv("TRITON_INTERPRET", raising=False)
        else:
            mp.setenv("TRITON_INTERPRET", "1")
        yield
    assert os.environ.get("TRITON_INTERPRET") == outer, "TRITON_INTERPRET leaked out of the kernel tests"


@pytest.fixture(autouse=True)
def _triton_ran(request):
    """Tests marked `kernels` must launch Triton kernels (not fall back to the PyTorch reference)."""
    before = sum(K.LAUNCHES.values())
    yield
    if request.node.get_closest_marker("kernels") is not None:
        assert sum(K.LAUNCHES.values()) > before, "no Triton kernel was launched: the test ran the reference"


kernels = pytest.mark.kernels
T = "triton"


def _logits(S, E, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, E, generator=g)
    if kind == "one_expert":  # every token wants expert E - 1
        x[:, E - 1] += 20
    elif kind == "ties":
        x = torch.randint(0, 2, (S, E), generator=g).float()
    elif kind == "skewed":  # experts 0-1 busy, most others empty
        x[:, :2] += 4
    return x.to(DEV)


# --------------------------------------------------------------------------------------------
# gate: softmax + top-k + positions + capacity
# --------------------------------------------------------------------------------------------

GATE_CASES = [
    # S, E, k, capacity, kind
    (1, 1, 1, 1, "randn"),
    (37, 5, 1, 4, "randn"),
    (200, 8, 1, 10, "one_expert"),
    (129, 7, 2, 30, "randn"),
    (300, 16, 2, 20, "skewed"),
    (64, 4, 2, -1, "ties"),
    (150, 6, 3, 40, "randn"),
    (90, 3, 3, -1, "randn"),
    (257, 64, 2, 9, "randn"),
    (5, 32, 3, 2, "ties"),
    (333, 128, 1, 3, "skewed"),
]


@pytest.mark.parametrize("S,E,k,capacity,kind", GATE_CASES)
@kernels
def test_gate_table_matches_reference(S, E, k, capacity, kind):
    logits = _logits(S, E, kind, seed=S)
    expert, slot, counts = G.gate_table_op(logits, k, capacity, T)
    want = R.gate_table(logits, k, capacity)
    assert torch.equal(expert, want[0])
    assert torch.equal(slot, want[1])
    assert torch.equal(counts, want[2])
    if kind == "one_expert" and k == 1:
        assert slot[:, 0].tolist() == list(range(capacity)) + [-1] * (S - capacity)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop,cf", [(True, 1.0), (True, 0.5), (False, 1.0)])
@kernels
def test_route_triton_equals_route_torch(k, drop, cf):
    logits = _logits(203, 8, "skewed", seed=k)
    a = route(logits, top_k=k, capacity_factor=cf, min_capacity=4, drop_tokens=drop, impl="torch")
    b = route(logits, top_k=k, capacity_factor=cf, min_capacity=4, drop_tokens=drop, impl="triton")
    assert a.capacity == b.capacity
    for name in ("expert", "slot", "weight", "counts", "aux_loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_empty_and_zero_sized():
    expert, slot, counts = G.gate_table_op(torch.zeros(0, 4, device=DEV), 2, -1, T)
    assert expert.shape == (0, 2) and counts.tolist() == [0] * 4
    r = route(torch.zeros(0, 4, device=DEV), top_k=2, drop_tokens=False, impl="triton")
    assert r.capacity == 0
    assert dispatch(torch.zeros(0, 3, device=DEV), r, 4, impl="triton").shape == (4, 0, 3)
    assert combine(torch.zeros(4, 0, 3, device=DEV), r, impl="triton").shape == (0, 3)


# --------------------------------------------------------------------------------------------
# dispatch / combine / route_dot
# --------------------------------------------------------------------------------------------


def _table(S, E, k, capacity, kind="skewed", seed=0):
    return R.gate_table(_logits(S, E, kind, seed), k, capacity)  # expert, slot, counts


MOVE_CASES = [
    # S, E, k, capacity, d
    (1, 1, 1, 1, 1),
    (50, 6, 1, 12, 20),
    (73, 8, 2, 9, 33),
    (100, 4, 3, 100, 16),
    (41, 16, 2, 2, 7),  # many drops, many empty experts
]


@pytest.mark.parametrize("S,E,k,C,d", MOVE_CASES)
@pytest.mark.parametrize("scaled", [False, True])
@kernels
def test_dispatch_matches_reference(S, E, k, C, d, scaled):
    expert, slot, counts = _table(S, E, k, C, seed=d)
    x = torch.randn(S, d, device=DEV)
    scale = torch.rand(S, k, device=DEV) if scaled else None
    out = G.dispatch_op(x, expert, slot, counts, scale, E, C, T)
    assert out.shape == (E, C, d)
    torch.testing.assert_close(out, R.dispatch(x, expert, slot, E, C, scale), rtol=0, atol=0)


@pytest.mark.parametrize("S,E,k,C,d", MOVE_CASES)
@pytest.mark.parametrize("weighted", [False, True])
@kernels
def test_combine_matches_reference(S, E, k, C, d, weighted):
    expert, slot, counts = _table(S, E, k, C, seed=d)
    y = torch.randn(E, C, d, device=DEV)
    w = torch.rand(S, k, device=DEV) if weighted else None
    torch.testing.assert_close(G.combine_op(y, expert, slot, counts, w, T), R.combine(y, expert, slot, w))


@pytest.mark.parametrize("S,E,k,C,d", MOVE_CASES)
@kernels
def test_route_dot_matches_reference(S, E, k, C, d):
    expert, slot, counts = _table(S, E, k, C, seed=d)
    a = torch.randn(S, d, device=DEV)
    b = torch.randn(E, C, d, device=DEV)
    torch.testing.assert_close(G.route_dot_op(a, b, expert, slot, counts, T), R.route_dot(a, b, expert, slot))


@kernels
def test_half_precision_accumulates_in_float32():
    S, E, k, C, d = 40, 4, 2, 20, 24
    expert, slot, counts = _table(S, E, k, C)
    y = torch.randn(E, C, d, device=DEV).half()
    w = torch.rand(S, k, device=DEV)
    out = G.combine_op(y, expert, slot, counts, w, T)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, R.combine(y, expert, slot, w))
    x = torch.randn(S, d, device=DEV).half()
    assert torch.equal(G.dispatch_op(x, expert, slot, counts, None, E, C, T), R.dispatch(x, expert, slot, E, C))


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


def _tiny(k=2, C=3):
    S, E, d = 7, 3, 3
    expert, slot, counts = _table(S, E, k, C, seed=1)
    assert bool((slot < 0).any()) and bool((slot >= 0).any())
    g = torch.Generator().manual_seed(2)
    dd = dict(dtype=torch.double)
    x = torch.randn(S, d, generator=g, **dd).to(DEV).requires_grad_(True)
    s = torch.rand(S, k, generator=g, **dd).to(DEV).requires_grad_(True)
    y = torch.randn(E, C, d, generator=g, **dd).to(DEV).requires_grad_(True)
    return S, E, C, d, expert, slot, counts, x, s, y


@kernels
def test_gradcheck_dispatch_combine_route_dot():
    S, E, C, d, expert, slot, n, x, s, y = _tiny()
    gc = dict(eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(lambda t, sc: G.dispatch_op(t, expert, slot, n, sc, E, C, T), (x, s), **gc)
    assert torch.autograd.gradcheck(lambda t: G.dispatch_op(t, expert, slot, n, None, E, C, T), (x,), **gc)
    assert torch.autograd.gradcheck(lambda t, w: G.combine_op(t, expert, slot, n, w, T), (y, s), **gc)
    assert torch.autograd.gradcheck(lambda a, b: G.route_dot_op(a, b, expert, slot, n, T), (x, y), **gc)


@kernels
def test_gradgradcheck_combine():
    S, E, C, d, expert, slot, n, x, s, y = _tiny(k=1, C=4)
    assert torch.autograd.gradgradcheck(lambda t, w: G.combine_op(t, expert, slot, n, w, T), (y, s),
                                        eps=1e-6, atol=1e-6, fast_mode=True)


@kernels
def test_moe_forward_backward_matches_torch_path():
    """route -> dispatch -> experts -> combine, gradients w.r.t. tokens, router and experts."""
    torch.manual_seed(0)
    S, E, d, k = 97, 6, 16, 2
    tokens = torch.randn(S, d, device=DEV)
    wg = torch.randn(d, E, device=DEV) * 0.3
    w1 = torch.randn(E, d, d, device=DEV) * 0.2
    grads = []
    for impl in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (tokens, wg, w1)]
        x, g, w = leaves
        r = route(x @ g, top_k=k, capacity_factor=0.8, min_capacity=2, impl=impl)
        out = combine(torch.tanh(torch.bmm(dispatch(x, r, E, impl=impl), w)), r, impl=impl)
        loss = (out * torch.linspace(-1, 1, d, device=DEV)).sum() + r.aux_loss
        grads.append((out.detach(), *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# custom-op checks, export, compile
# --------------------------------------------------------------------------------------------


@kernels
def test_opcheck():
    S, E, C, d, expert, slot, n, x, s, y = _tiny()
    f32 = dict(dtype=torch.float32)
    xf, sf, yf = (t.detach().to(**f32).requires_grad_(True) for t in (x, s, y))
    for impl in ("torch", T):
        torch.library.opcheck(G.gate_table_op, (_logits(37, 5), 2, 9, impl))
        torch.library.opcheck(G.gate_table_op, (_logits(37, 5), 3, -1, impl))
        torch.library.opcheck(G.dispatch_op, (xf, expert, slot, n, sf, E, C, impl))
        torch.library.opcheck(G.dispatch_op, (xf, expert, slot, n, None, E, C, impl))
        torch.library.opcheck(G.combine_op, (yf, expert, slot, n, sf, impl))
        torch.library.opcheck(G.combine_op, (yf, expert, slot, n, None, impl))
        torch.library.opcheck(G.route_dot_op, (xf, yf, expert, slot, n, impl))


class _MoE(torch.nn.Module):
    def __init__(self, d=8, E=4, k=2, drop=True):
        super().__init__()
        self.wg = torch.nn.Parameter(torch.randn(d, E) * 0.5)
        self.w = torch.nn.Parameter(torch.randn(E, d, d) * 0.3)
        self.E, self.k, self.drop = E, k, drop

    def forward(self, x):
        r = route(x @ self.wg, top_k=self.k, capacity_factor=1.0, min_capacity=2, drop_tokens=self.drop,
                  impl="triton")
        return combine(torch.bmm(dispatch(x, r, self.E, impl="triton"), self.w), r, impl="triton"), r.aux_loss


@pytest.mark.parametrize("drop", [True, False])
@kernels
def test_export_with_dynamic_tokens(drop):
    torch.manual_seed(0)
    m = _MoE(drop=drop).to(DEV)
    x = torch.randn(40, 8, device=DEV)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("S", min=2, max=4096)},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("moefx.gate_table" in t for t in targets) and any("moefx.combine_tokens" in t for t in targets)
    x2 = torch.randn(57, 8, device=DEV)  # another token count
    for got, want in zip(ep.module()(x2), m(x2)):
        torch.testing.assert_close(got, want)


@kernels
def test_torch_compile_forward_backward():
    torch.manual_seed(0)
    m = _MoE(drop=True).to(DEV)
    x = torch.randn(48, 8, device=DEV)
    out, aux = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    (out.square().sum() + aux).backward()
    got = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out2, aux2 = m(x)
    (out2.square().sum() + aux2).backward()
    torch.testing.assert_close(out, out2)
    for a, p in zip(got, m.parameters()):
        torch.testing.assert_close(a, p.grad)


@kernels
def test_eager_fast_path_equals_the_custom_ops():
    logits = _logits(150, 8, "skewed")
    x = torch.randn(150, 12, device=DEV)
    r = route(logits, top_k=2, capacity_factor=0.7, impl="triton")
    assert G.plain_eager(x) and not G.plain_eager(x.requires_grad_(True))
    with torch.no_grad():                    # parameters are plain tensors too (the gather path passes weights)
        assert G.plain_eager(torch.nn.Parameter(torch.ones(2)))
    x.requires_grad_(False)
    e, s, n = G.gate_table_op(logits, 2, r.capacity, T)
    assert torch.equal(e, r.expert) and torch.equal(s, r.slot) and torch.equal(n, r.counts)
    buf = G.dispatch(x, r.expert, r.slot, r.counts, 8, r.capacity, T)
    assert torch.equal(buf, G.dispatch_op(x, r.expert, r.slot, r.counts, None, 8, r.capacity, T))
    assert torch.equal(G.combine(buf, r.expert, r.slot, r.counts, r.weight, T),
                       G.combine_op(buf, r.expert, r.slot, r.counts, r.weight, T))


@kernels
def test_kernels_are_interpreted_on_cpu_and_compiled_on_cuda(monkeypatch):
    """The module's fixture picks how the kernels run, and they run that way (and right) on every device:
    Triton's interpreter without a GPU, the JIT-compiled kernels on CUDA."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpret = DEV == "cpu"
    assert os.environ.get("TRITON_INTERPRET") == ("1" if interpret else None)
    assert K._interpreting() is interpret and K.can_run(torch.empty(1, device=DEV))
    ran = []
    kernel = K._kernel
    monkeypatch.setattr(K, "_kernel", lambda fn: ran.append(kernel(fn)) or ran[-1])
    logits = _logits(37, 5)
    for got, want in zip(G.gate_table_op(logits, 2, 9, T), R.gate_table(logits, 2, 9), strict=True):
        assert got.device.type == DEV and torch.equal(got, want)
    assert ran and all(type(k) is (InterpretedFunction if interpret else JITFunction) for k in ran), ran
