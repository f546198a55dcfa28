"""The GPU GEMM (gptqkit.ops / QuantLinear on CUDA) against the dequantize oracle.

GPU tests run only with a CUDA (or ROCm) device and a gptqkit built with a GPU
backend; they are skipped otherwise. The CPU tests check everything that does
not need a GPU: the kernels' layout (through the op's pure-torch CPU
reference), the fake/meta implementation, torch.compile tracing, argument
errors, and the error of a build without GPU support.
"""

from __future__ import annotations

import pytest
torch = pytest.importorskip("torch")
from packed_layers import random_packed_layer

BITS = (2, 3, 4, 8)


def _oracle(packed):
    """The dense float32 weight [N, K] from gptqkit's CPU dequantize."""
    return torch.as_tensor(packed.dequantize()).float()


def _layout(gptqkit, packed, dtype=torch.float16, device="cpu"):
    from gptqkit import ops

    return ops.prepare_layout(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, packed.bits,
                              packed.format, dtype=dtype, device=device)


def _call(layout, x, bias=None):
    return torch.ops.gptqkit.quantized_matmul(x, layout.qweight, layout.sz, layout.chunk_group, layout.perm, bias,
                                              layout.bits, layout.in_features, layout.out_features)


def _bound(x, w, ref, dtype):
    """Error bound: the weight and the output rounded once to the 16-bit type, fp32 accumulation."""
    u = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
    return 4 * u * (x.abs().double() @ w.abs().double().T) + 2 * u * ref.abs() + 1e-6


# ============================================================================ CPU-runnable


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (128, False), (32, True),
                                                  (128, True), (8, False), (48, True)])
def test_layout_decodes_to_the_oracle(gptqkit, bits, group_size, act_order):
    from gptqkit.ops import _dequantize_reference

    n, k = 203, 333  # odd K and N: padded columns, a partial last chunk and group
    packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order=act_order, seed=bits * 7 + group_size)
    lay = _layout(gptqkit, packed)
    assert lay.qweight.shape[1] % 128 == 0 and lay.qweight.shape[1] >= n
    assert lay.qweight.shape[0] == lay.chunk_group.shape[0] * bits
    needs_perm = act_order or group_size % 32 != 0
    assert (lay.perm is not None) == (needs_perm and group_size != -1)
    w = _dequantize_reference(lay.qweight, lay.sz, lay.chunk_group, lay.perm, bits, k, n)
    # fp16 checkpoint scales are exact in the fp16 layout: bit-identical to the oracle
    torch.testing.assert_close(w, _oracle(packed), rtol=0, atol=0)


def test_layout_without_reordering_keeps_the_checkpoint_words(gptqkit):
    packed = random_packed_layer(gptqkit, 256, 512, 4, 128)
    lay = _layout(gptqkit, packed)
    assert lay.perm is None
    assert torch.equal(lay.qweight, torch.as_tensor(packed.qweight))


def test_bf16_layout(gptqkit):
    from gptqkit.ops import _dequantize_reference

    packed = random_packed_layer(gptqkit, 64, 96, 4, 32, act_order=True)
    lay = _layout(gptqkit, packed, dtype=torch.bfloat16)
    assert lay.sz.dtype == torch.bfloat16
    w = _dequantize_reference(lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, 96, 64)
    torch.testing.assert_close(w, _oracle(packed), rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("m", [1, 5, 17])
def test_op_cpu_reference(gptqkit, m):
    packed = random_packed_layer(gptqkit, 45, 100, 3, 32, act_order=True, seed=m)
    lay = _layout(gptqkit, packed)
    x = torch.randn(m, 100).half()
    bias = torch.randn(45).half()
    y = _call(lay, x, bias)
    w = _oracle(packed).double()
    ref = x.double() @ w.T + bias.double()
    assert y.dtype == torch.float16 and y.shape == (m, 45)
    assert ((y.double() - ref).abs() <= _bound(x, w, ref, torch.float16)).all()


def test_fake_implementation_on_meta(gptqkit):
    packed = random_packed_layer(gptqkit, 45, 100, 4, 32, act_order=True)
    lay = _layout(gptqkit, packed, dtype=torch.bfloat16).to("meta")
    x = torch.empty(7, 100, dtype=torch.bfloat16, device="meta")
    y = _call(lay, x)
    assert y.device.type == "meta" and y.shape == (7, 45) and y.dtype == torch.bfloat16
    w = torch.ops.gptqkit.dequantize_layout(lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, 100, 45)
    assert w.device.type == "meta" and w.shape == (45, 100) and w.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"x: expected shape \[M, 100\]"):
        _call(lay, torch.empty(7, 99, dtype=torch.bfloat16, device="meta"))


def test_opcheck(gptqkit):
    packed = random_packed_layer(gptqkit, 24, 64, 4, 32, act_order=True)
    lay = _layout(gptqkit, packed)
    x = torch.randn(3, 64).half()
    args = (x, lay.qweight, lay.sz, lay.chunk_group, lay.perm, torch.randn(24).half(), 4, 64, 24)
    torch.library.opcheck(torch.ops.gptqkit.quantized_matmul.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_traces_the_op(gptqkit):
    packed = random_packed_layer(gptqkit, 24, 64, 4, 32)
    lay = _layout(gptqkit, packed)

    def f(x):
        return _call(lay, torch.relu(x)) * 2

    x = torch.randn(5, 64).half()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


def test_bad_arguments(gptqkit):
    packed = random_packed_layer(gptqkit, 24, 64, 4, 32)
    lay = _layout(gptqkit, packed)
    with pytest.raises(ValueError, match="x: expected dtype torch.float16"):
        _call(lay, torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x: expected a 2-d"):
        _call(lay, torch.randn(2, 2, 64).half())
    with pytest.raises(ValueError, match=r"bias: expected shape \(24,\)"):
        _call(lay, torch.randn(2, 64).half(), torch.randn(23).half())
    with pytest.raises(ValueError, match="dtype"):
        from gptqkit import ops

        ops.prepare_layout(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, 4, dtype=torch.float32)


def test_native_prepare_validates_outputs(gptqkit):
    from gptqkit._native import _C

    p = random_packed_layer(gptqkit, 24, 64, 4, 32)
    q, z, s, g = (torch.as_tensor(t) for t in (p.qweight, p.qzeros, p.scales, p.g_idx))
    shape = _C.gpu_gemm_shape(g, 24, 2, 4)
    assert shape == {"chunks": 2, "positions": 64, "padded_out": 128, "reordered": False}
    good = dict(out_qweight=torch.empty(8, 128, dtype=torch.int32), out_sz=torch.empty(2, 128, 2).half(),
                out_chunk_group=torch.empty(2, dtype=torch.int32), out_perm=None)
    _C.prepare_gpu_weight(q, z, s, g, 4, "v1", **good)
    with pytest.raises(ValueError, match=r"out.qweight: expected shape \[8, 128\]"):
        _C.prepare_gpu_weight(q, z, s, g, 4, "v1", **{**good, "out_qweight": torch.empty(8, 24, dtype=torch.int32)})
    with pytest.raises(ValueError, match="out.sz: expected dtype"):
        _C.prepare_gpu_weight(q, z, s, g, 4, "v1", **{**good, "out_sz": torch.empty(2, 128, 2)})
    with pytest.raises(ValueError, match="g_idx"):
        _C.gpu_gemm_shape(torch.full((64,), 5, dtype=torch.int32), 24, 2, 4)


@pytest.mark.parametrize("name,getter,default,good,bads", [
    ("GPTQKIT_GPU_WGMMA_MIN_ROWS", "wgmma_min_rows", 128, "0", ("-1", "lots", "1.5")),
    ("GPTQKIT_GPU_SKINNY_MAX_ROWS", "skinny_max_rows", 0, "16", ("-1", "all", "8.0")),
    ("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "inkernel_reduce_max_rows", 0, "16", ("-2", "yes", "1e3")),
])
def test_routing_variables_are_checked(gptqkit, monkeypatch, name, getter, default, good, bads):
    """The native library ignores a malformed routing variable; the op must refuse it instead."""
    from gptqkit import ops

    rows = getattr(ops, getter)
    monkeypatch.delenv(name, raising=False)
    assert rows() == default
    monkeypatch.setenv(name, good)
    assert rows() == int(good)
    for bad in bads:
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=f"{name}: expected an integer >= 0"):
            rows()


def test_overlapped_launches_variable_is_checked(gptqkit, monkeypatch):
    from gptqkit import ops

    monkeypatch.delenv("GPTQKIT_GPU_PDL", raising=False)
    assert ops.overlapped_launches() is False
    monkeypatch.setenv("GPTQKIT_GPU_PDL", "1")
    assert ops.overlapped_launches() is True
    for bad in ("2", "yes", "on", ""):
        monkeypatch.setenv("GPTQKIT_GPU_PDL", bad)
        with pytest.raises(ValueError, match="GPTQKIT_GPU_PDL: expected 0 or 1"):
            ops.overlapped_launches()
        with pytest.raises(ValueError, match="GPTQKIT_GPU_PDL"):
            ops._routing()


def test_routing_is_parsed_once_per_value_and_bad_values_always_raise(gptqkit, monkeypatch):
    from gptqkit import ops

    monkeypatch.delenv("GPTQKIT_GPU_DENSE_MIN_ROWS", raising=False)
    monkeypatch.delenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", raising=False)
    monkeypatch.delenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", raising=False)
    raw, dense, reduce_rows = ops._routing()
    assert (dense, reduce_rows) == (256, 0) and ops._routing() == (raw, dense, reduce_rows)
    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "64")
    assert ops._routing()[1] == 64
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "16")
    assert ops._routing()[1:] == (64, 16)
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "often")
    for _ in range(2):  # never remembered as checked
        with pytest.raises(ValueError, match="GPTQKIT_GPU_SKINNY_MAX_ROWS"):
            ops._routing()
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "16")
    assert ops._routing()[1] == 64


def test_workspace_size_is_asked_once_per_plan_input(gptqkit, monkeypatch):
    """Everything the native planner reads is in the key: rows, x's alignment, shapes, routing."""
    from gptqkit import ops

    asked = []

    class NativeStandIn:
        @staticmethod
        def gpu_matmul_workspace_bytes(x, *args):
            asked.append((x.shape[0], x.data_ptr() % 16))
            return 1024 * x.shape[0]

    lay = _layout(gptqkit, random_packed_layer(gptqkit, 64, 128, 4, 32))
    monkeypatch.setattr(ops, "_C", NativeStandIn)
    monkeypatch.setattr(ops, "_workspace_sizes", {})
    base = torch.zeros(4 * 128 + 8, dtype=torch.float16)
    x1, x4 = base[:128].view(1, 128), base[:512].view(4, 128)
    shifted = base[1:129].view(1, 128)  # 2 bytes off: the kernel must gather it
    args = (lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, 128, 64)
    routing = ("r",)
    for x in (x1, x1, x4, x1, shifted, shifted):
        assert ops._workspace_bytes(x, *args, routing) == 1024 * x.shape[0]
    assert asked == [(1, 0), (4, 0), (1, 2)]
    ops._workspace_bytes(x1, *args, ("other routing",))
    assert len(asked) == 4


def test_build_without_gpu_says_how_to_rebuild(gptqkit):
    from gptqkit import ops
    from gptqkit._native import _C

    if ops.gpu_backend() != "none":
        pytest.skip("this build has a GPU backend")
    with pytest.raises(NotImplementedError, match="built without GPU support.*GPTQKIT_WITH_CUDA=1"):
        ops.require_gpu_backend()
    p = random_packed_layer(gptqkit, 24, 64, 4, 32)
    lay = _layout(gptqkit, p)
    with pytest.raises(NotImplementedError, match="built without GPU support"):
        _C.gpu_quantized_matmul(torch.randn(2, 64).half(), lay.qweight, lay.sz, lay.chunk_group, None, None,
                                torch.empty(2, 24).half(), 4, 64, 24, 0)


# ============================================================================ GPU


def _no_gpu():
    try:
        from gptqkit.ops import gpu_unavailable_reason
    except Exception as exc:  # pragma: no cover - the gptqkit fixture reports it
        return f"gptqkit is not importable: {exc}"
    return gpu_unavailable_reason()


_NO_GPU = _no_gpu()
gpu = pytest.mark.skipif(_NO_GPU is not None, reason=str(_NO_GPU))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (32, True), (128, False), (128, True)])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33, 64, 255, 1024])
def test_gpu_matches_oracle(gptqkit, monkeypatch, dtype, bits, group_size, act_order, m):
    n, k = 203, 333
    packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order=act_order, seed=bits + m)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    w = _oracle(packed).double()
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if m % 2 else None
    ref = x.double() @ w.T + (bias.double() if bias is not None else 0)
    # The native kernels; for 4-bit and M <= 8 also the GEMV kernel (the
    # tensor-core kernel takes those rows by default) and for M <= 16 the
    # skinny tensor-core kernel (opt-in); dequantize + torch GEMM.
    paths = (["kernel"] + (["gemv"] if bits == 4 and m <= 8 else []) + (["skinny"] if bits == 4 and m <= 16 else [])
             + (["dense"] if m >= 255 else []))
    for path in paths:
        monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1" if path == "dense" else "1000000000")
        monkeypatch.setenv("GPTQKIT_GPU_MMA_MIN_ROWS", "9" if path == "gemv" else "1")
        monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "16" if path == "skinny" else "0")
        y = _call(lay, x.cuda(), None if bias is None else bias.cuda())
        torch.cuda.synchronize()
        assert y.shape == (m, n) and y.dtype == dtype
        err = (y.cpu().double() - ref).abs()
        bound = _bound(x, w, ref, dtype)
        assert (err <= bound).all(), f"{path}: max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["direct", "act_order"])
@pytest.mark.parametrize("m", [9, 16, 64, 255])
def test_gpu_mma_split_k_on_a_real_shape(gptqkit, monkeypatch, dtype, act_order, m):
    """The 4-bit tensor-core kernel at a 7B layer's width: with the workspace the op asks for (K split across
    blocks, act-order x gathered) and without one (unsplit, or the tiled kernel): both within the oracle's bound,
    and repeated calls bit-identical (the splits are summed in a fixed order)."""
    from gptqkit import ops
    from gptqkit._native import _C

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    n = k = 4096
    packed = random_packed_layer(gptqkit, n, k, 4, 128, act_order=act_order, seed=m)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    w = _oracle(packed).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    ref = x.double() @ w.T
    bound = _bound(x, w, ref, dtype)
    xc = x.cuda()
    args = (lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, k, n)
    nbytes = _C.gpu_matmul_workspace_bytes(xc, *args)
    if torch.cuda.get_device_capability()[0] >= 8 and ops.gpu_backend() == "cuda":
        assert nbytes > 0, "a 4096-wide layer at M >= 9 splits K on sm_80+"
    y_split = _call(lay, xc)
    assert torch.equal(_call(lay, xc), y_split), "split-K results must be deterministic"
    y_plain = torch.empty_like(y_split)
    _C.gpu_quantized_matmul(xc, lay.qweight, lay.sz, lay.chunk_group, lay.perm, None, y_plain, 4, k, n,
                            torch.cuda.current_stream().cuda_stream, None)
    torch.cuda.synchronize()
    for name, y in (("workspace", y_split), ("no workspace", y_plain)):
        err = (y.cpu().double() - ref).abs()
        assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("group_size,act_order", [(128, False), (128, True), (32, False), (-1, False)])
@pytest.mark.parametrize("m", [1, 4, 9, 16])
def test_gpu_skinny_on_a_real_shape(gptqkit, monkeypatch, dtype, group_size, act_order, m):
    """The skinny tensor-core kernel (M <= 16, opt-in) at a 7B layer's width with split K: really the kernel
    that ran on sm_80+, within the oracle's bound, deterministic, and with or without the workspace."""
    from gptqkit import ops
    from gptqkit._native import _C

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "16")
    n, k = 4000, 4096  # N not a multiple of the 128-column tile
    packed = random_packed_layer(gptqkit, n, k, 4, group_size, act_order=act_order, seed=m + 11)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    w = _oracle(packed).double()
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    ref = x.double() @ w.T + bias.double()
    bound = _bound(x, w, ref, dtype)
    xc = x.cuda()
    kernel = ops.matmul_kernel(xc, lay)
    if ops.gpu_backend() == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        assert kernel == "skinny", f"sm_80+ with GPTQKIT_GPU_SKINNY_MAX_ROWS=16 should run the skinny kernel, got {kernel!r}"
    y = _call(lay, xc, bias.cuda())
    assert torch.equal(_call(lay, xc, bias.cuda()), y), "repeated calls must give identical bits"
    y_plain = torch.empty_like(y)  # no workspace: unsplit (or, for act-order x, the tiled kernel)
    _C.gpu_quantized_matmul(xc, lay.qweight, lay.sz, lay.chunk_group, lay.perm, bias.cuda(), y_plain, 4, k, n,
                            torch.cuda.current_stream().cuda_stream, None)
    torch.cuda.synchronize()
    for name, out in (("workspace", y), ("no workspace", y_plain)):
        err = (out.cpu().double() - ref).abs()
        assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def _kernel_names(fn):
    """Names of the GPU kernels ``fn()`` launches (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@gpu
@pytest.mark.parametrize("dtype,act_order", [(torch.float16, False), (torch.bfloat16, True)],
                         ids=["float16-direct", "bfloat16-act_order"])
@pytest.mark.parametrize("m,skinny", [(1, 0), (1, 16), (4, 16), (16, 0), (33, 0), (64, 0)])
def test_gpu_inkernel_reduce_matches_the_reduce_kernel(gptqkit, monkeypatch, dtype, act_order, m, skinny):
    """Split-K sums added by the GEMM kernel's last block per tile (GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS):
    the same bits as the separate reduction, no second kernel, the tile counters back at zero."""
    from gptqkit import ops

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", str(skinny))
    n = k = 4096  # 32 column tiles: K is split on every GPU with 16 or more SMs
    packed = random_packed_layer(gptqkit, n, k, 4, 128, act_order=act_order, seed=m + 21)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    w = _oracle(packed).double()
    ref = x.double() @ w.T + bias.double()
    xc, bc = x.cuda(), bias.cuda()
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "0")
    separate = _call(lay, xc, bc)
    separate_kernels = _kernel_names(lambda: _call(lay, xc, bc))
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "64")
    fused = [_call(lay, xc, bc) for _ in range(3)]
    fused_kernels = _kernel_names(lambda: _call(lay, xc, bc))
    torch.cuda.synchronize()
    counters = ops._tile_counter_buffers[torch.cuda.current_device()]
    assert int(counters.abs().sum()) == 0, "every call must leave the tile counters at zero"
    if ops.gpu_backend() == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        assert any("splitk_reduce" in name for name in separate_kernels), separate_kernels
        assert not any("splitk_reduce" in name for name in fused_kernels), fused_kernels
    for y in fused:
        assert torch.equal(y, separate), "the in-kernel sums must have the reduce kernel's bits"
    err = (separate.cpu().double() - ref).abs()
    assert (err <= _bound(x, w, ref, dtype)).all(), f"max error {err.max():.3g}"


@gpu
def test_gpu_inkernel_reduce_on_concurrent_streams_and_in_a_graph(gptqkit, monkeypatch):
    """Each stream has its own row of tile counters: the same layer on two streams at once, and inside a
    captured CUDA graph replayed many times, gives the separate reduction's bits."""
    from gptqkit import ops

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    n = k = 4096
    packed = random_packed_layer(gptqkit, n, k, 4, 128, seed=5)
    lay = _layout(gptqkit, packed, device="cuda")
    xs = [torch.randn(m, k, device="cuda").half() for m in (1, 8)]
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "0")
    expected = [_call(lay, x) for x in xs]
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", "16")
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(20):
        for i, (x, st) in enumerate(zip(xs, streams)):
            with torch.cuda.stream(st):
                outs[i].append(_call(lay, x))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(y, expected[i]) for y in outs[i]), f"stream {i}: wrong sums"
    rows = [ops._tile_counters(torch.cuda.current_device(), st.cuda_stream) for st in streams]
    assert rows[0] is not None and rows[1] is not None and rows[0].data_ptr() != rows[1].data_ptr()

    x = xs[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _call(lay, x)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected[0])
    assert int(ops._tile_counter_buffers[torch.cuda.current_device()].abs().sum()) == 0


@gpu
@pytest.mark.parametrize("reduce_rows", ["0", "64"], ids=["reduce_kernel", "inkernel_reduce"])
def test_gpu_overlapped_launches_keep_every_dependency(gptqkit, monkeypatch, reduce_rows):
    """Programmatic dependent launches (GPTQKIT_GPU_PDL=1): a chain of layers where each reads the output
    of the one before (x gathered for act-order, K split, sums added by either path), eager and in a CUDA
    graph, gives the ordinary launches' bits. A kernel that read x or wrote before waiting for the previous
    one would read stale inputs here."""
    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    monkeypatch.setenv("GPTQKIT_GPU_INKERNEL_REDUCE_MAX_ROWS", reduce_rows)
    k = 4096
    layers = [_layout(gptqkit, random_packed_layer(gptqkit, k, k, 4, 128, act_order=i % 2 == 1, seed=40 + i),
                      device="cuda") for i in range(4)]
    x0 = torch.randn(3, k, device="cuda").half() * 0.5

    def chain(x):
        for lay in layers:
            x = torch.tanh(_call(lay, x))  # bounded, and a torch kernel between two of ours
            x = _call(lay, x)
        return x

    monkeypatch.setenv("GPTQKIT_GPU_PDL", "0")
    expected = chain(x0)
    monkeypatch.setenv("GPTQKIT_GPU_PDL", "1")
    for _ in range(5):
        assert torch.equal(chain(x0), expected), "eager chain differs with overlapped launches"
    x = x0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = chain(x)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected), "graph replay differs with overlapped launches"


@pytest.mark.parametrize("k,group_size", [(256, 32), (200, 48)], ids=["g32", "g48-padded"])
def test_position_order_product_equals_the_original(gptqkit, k, group_size):
    """The act-order dense path's identity, on the CPU with the pure-torch layout reference: the weight in
    position order (padding positions included, whose value is scale * (0 - zero)) times x gathered into
    that order (zeros at padding) is x @ W.T."""
    from gptqkit import ops

    n = 96
    packed = random_packed_layer(gptqkit, n, k, 4, group_size, act_order=True, seed=k)
    lay = _layout(gptqkit, packed)
    assert lay.perm is not None and int((lay.perm < 0).sum()) == (lay.perm.shape[0] - k)
    w_pos = ops._positions_reference(lay.qweight, lay.sz, lay.chunk_group, 4, n, torch.float64).T  # [N, Kp]
    if group_size == 48:
        assert (w_pos[:, lay.perm < 0] != 0).any(), "padding positions must not be zero here, or x's zeros go untested"
    x = torch.randn(5, k, dtype=torch.float64)
    xp = ops.gather_positions(x, lay.perm)
    assert xp.shape == (5, lay.perm.shape[0]) and (xp[:, lay.perm < 0] == 0).all()
    ref = x @ _oracle(packed).double().T
    torch.testing.assert_close(xp @ w_pos.T, ref, rtol=1e-9, atol=1e-9)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("group_size", [128, 48])
def test_gpu_act_order_dense_path_writes_whole_rows(gptqkit, monkeypatch, dtype, group_size):
    """Act-order layers at large M: the weight dequantized in position order by the row-writing tile
    kernel (never the scattering one), x gathered, within the oracle's bound; and the positions' weights
    are exactly the original-order weights of their columns."""
    from gptqkit import ops
    from gptqkit._native import _C

    n, k, m = 1000, 4096, 300
    packed = random_packed_layer(gptqkit, n, k, 4, group_size, act_order=True, seed=group_size)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    w = _oracle(packed).double()
    ref = x.double() @ w.T + bias.double()
    assert ops.matmul_kernel(x.cuda(), lay) == "dense"
    y = _call(lay, x.cuda(), bias.cuda())
    names = _kernel_names(lambda: _call(lay, x.cuda(), bias.cuda()))
    assert any("dequant_tile_kernel" in name for name in names), names
    assert not any("dequant_kernel<" in name for name in names), names
    err = (y.cpu().double() - ref).abs()
    assert (err <= _bound(x, w, ref, dtype)).all(), f"max error {err.max():.3g}"
    args = (lay.qweight, lay.sz, lay.chunk_group, lay.perm, 4, k, n)
    w_pos = torch.empty(n, lay.perm.shape[0], dtype=dtype, device="cuda")
    _C.gpu_dequantize_prepared(*args[:4], w_pos, *args[4:], torch.cuda.current_stream().cuda_stream, positions=True)
    w_orig = ops.dequantize_layout(*args)
    valid = lay.perm >= 0
    assert torch.equal(w_pos[:, valid], w_orig[:, lay.perm[valid].long()])


def test_tile_counter_rows_are_per_stream(gptqkit, monkeypatch):
    """The row assignment of the in-kernel reduction's counters (device-independent logic): one row per
    stream, the same row again for the same stream, none once every row is taken or before the device's
    counters exist."""
    from gptqkit import ops

    buffer = torch.zeros((ops._COUNTER_STREAMS, 4), dtype=torch.int32)
    monkeypatch.setattr(ops, "_tile_counter_buffers", {0: buffer})
    monkeypatch.setattr(ops, "_tile_counter_rows", {})
    rows = [ops._tile_counters(0, stream) for stream in range(100, 100 + ops._COUNTER_STREAMS)]
    assert len({r.data_ptr() for r in rows}) == ops._COUNTER_STREAMS
    assert all(r.shape == (4,) for r in rows)
    assert ops._tile_counters(0, 103) is rows[3]
    assert ops._tile_counters(0, 999) is None  # every row taken: the separate reduction
    assert ops._tile_counters(1, 100) is None  # no counters made for device 1

    # Threads meeting new streams at the same time still get a row each.
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(ops, "_tile_counter_rows", {})
    with ThreadPoolExecutor(max_workers=ops._COUNTER_STREAMS) as pool:
        rows = list(pool.map(lambda stream: ops._tile_counters(0, stream), range(ops._COUNTER_STREAMS)))
    assert len({r.data_ptr() for r in rows}) == ops._COUNTER_STREAMS


def _wgmma_expected():
    """Whether this GPU runs the wgmma kernel: Hopper (compute capability 9.0) with the default build (sm_90a)."""
    from gptqkit import ops

    return ops.gpu_backend() == "cuda" and torch.cuda.get_device_capability() == (9, 0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("act_order", [False, True], ids=["direct", "act_order"])
@pytest.mark.parametrize("m", [9, 64, 65, 128, 255, 1024])
def test_gpu_wgmma_on_a_real_shape(gptqkit, monkeypatch, dtype, act_order, m):
    """The Hopper wgmma kernel (token tiles of 64 and 128, partial tiles, split K, act-order x gathered) at a 7B
    layer's width, forced on from 9 rows: within the oracle's bound, deterministic, and on an H100 really the
    kernel that ran. Elsewhere the same calls take the mma.sync or tiled kernel."""
    from gptqkit import ops

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000000")
    monkeypatch.setenv("GPTQKIT_GPU_WGMMA_MIN_ROWS", "9")
    n, k = 4000, 4096  # N not a multiple of the 128-column tile
    packed = random_packed_layer(gptqkit, n, k, 4, 128, act_order=act_order, seed=m + 7)
    lay = _layout(gptqkit, packed, dtype=dtype, device="cuda")
    w = _oracle(packed).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.double() @ w.T + bias.double()
    xc = x.cuda()
    kernel = ops.matmul_kernel(xc, lay)
    if _wgmma_expected():
        assert kernel == "wgmma", (f"an H100/H200 should run the wgmma kernel at M = {m}, got {kernel!r}: was gptqkit "
                                   "built without sm_90a code (CMAKE_CUDA_ARCHITECTURES must name 90a, not 90)?")
    y = _call(lay, xc, bias.cuda())
    assert torch.equal(_call(lay, xc, bias.cuda()), y), "repeated calls must give identical bits"
    err = (y.cpu().double() - ref).abs()
    bound = _bound(x, w, ref, dtype)
    assert (err <= bound).all(), f"{kernel}: max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@gpu
def test_gpu_kernel_routing(gptqkit, monkeypatch):
    """matmul_kernel names the kernel each M takes, and the row thresholds move it."""
    from gptqkit import ops

    monkeypatch.delenv("GPTQKIT_GPU_WGMMA_MIN_ROWS", raising=False)
    monkeypatch.delenv("GPTQKIT_GPU_DENSE_MIN_ROWS", raising=False)
    monkeypatch.delenv("GPTQKIT_GPU_MMA_MIN_ROWS", raising=False)
    monkeypatch.delenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", raising=False)
    packed = random_packed_layer(gptqkit, 512, 1024, 4, 128)
    lay = _layout(gptqkit, packed, device="cuda")

    def kernel(m):
        return ops.matmul_kernel(torch.randn(m, 1024, device="cuda").half(), lay)

    tensor_cores = ops.gpu_backend() == "cuda" and torch.cuda.get_device_capability()[0] >= 8
    assert kernel(1) == kernel(8) == ("mma" if tensor_cores else "gemv")
    monkeypatch.setenv("GPTQKIT_GPU_MMA_MIN_ROWS", "4")
    assert kernel(3) == "gemv"
    assert kernel(4) == ("mma" if tensor_cores else "gemv")
    monkeypatch.setenv("GPTQKIT_GPU_MMA_MIN_ROWS", "9")
    assert kernel(8) == "gemv"
    assert kernel(9) == ("mma" if tensor_cores else "tiled")
    monkeypatch.setenv("GPTQKIT_GPU_MMA_MIN_ROWS", "none")
    with pytest.raises(ValueError, match="GPTQKIT_GPU_MMA_MIN_ROWS"):
        kernel(1)
    monkeypatch.delenv("GPTQKIT_GPU_MMA_MIN_ROWS")
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "8")
    assert kernel(1) == kernel(8) == ("skinny" if tensor_cores else "gemv")
    assert kernel(9) == ("mma" if tensor_cores else "tiled")
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "64")  # one 16-row tile at most
    assert kernel(16) == ("skinny" if tensor_cores else "tiled")
    assert kernel(17) == ("mma" if tensor_cores else "tiled")
    monkeypatch.setenv("GPTQKIT_GPU_SKINNY_MAX_ROWS", "some")
    with pytest.raises(ValueError, match="GPTQKIT_GPU_SKINNY_MAX_ROWS"):
        kernel(1)
    monkeypatch.delenv("GPTQKIT_GPU_SKINNY_MAX_ROWS")
    assert kernel(16) == ("mma" if tensor_cores else "tiled")
    assert kernel(127) == ("mma" if tensor_cores else "tiled")
    assert kernel(128) == ("wgmma" if _wgmma_expected() else "mma" if tensor_cores else "tiled")
    assert kernel(255) == ("wgmma" if _wgmma_expected() else "mma" if tensor_cores else "tiled")
    assert kernel(256) == kernel(1024) == "dense"
    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1000000")
    monkeypatch.setenv("GPTQKIT_GPU_WGMMA_MIN_ROWS", "0")
    assert kernel(512) == ("mma" if tensor_cores else "tiled")
    monkeypatch.setenv("GPTQKIT_GPU_WGMMA_MIN_ROWS", "many")
    with pytest.raises(ValueError, match="GPTQKIT_GPU_WGMMA_MIN_ROWS"):
        _call(lay, torch.randn(16, 1024, device="cuda").half())


@gpu
def test_gpu_workspace_is_validated(gptqkit):
    from gptqkit._native import _C

    packed = random_packed_layer(gptqkit, 256, 512, 4, 128)
    lay = _layout(gptqkit, packed, device="cuda")
    x = torch.randn(16, 512, device="cuda").half()
    y = torch.empty(16, 256, dtype=torch.float16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="workspace: expected a GPU array"):
        _C.gpu_quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, None, None, y, 4, 512, 256, stream,
                                torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="workspace: overlaps the memory of y"):
        _C.gpu_quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, None, None, y, 4, 512, 256, stream,
                                y.view(torch.uint8))
    # Too small a workspace is not an error: the call runs unsplit.
    _C.gpu_quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, None, None, y, 4, 512, 256, stream,
                            torch.empty(16, dtype=torch.uint8, device="cuda"))
    ref = x.cpu().double() @ _oracle(packed).double().T
    assert ((y.cpu().double() - ref).abs() <= _bound(x.cpu(), _oracle(packed).double(), ref, torch.float16)).all()


@gpu
@pytest.mark.parametrize("bits", BITS)
def test_gpu_dequantize_layout(gptqkit, bits):
    packed = random_packed_layer(gptqkit, 203, 333, bits, 32, act_order=True)
    lay = _layout(gptqkit, packed, device="cuda")
    w = torch.ops.gptqkit.dequantize_layout(lay.qweight, lay.sz, lay.chunk_group, lay.perm, bits, 333, 203)
    torch.testing.assert_close(w.cpu().float(), _oracle(packed), rtol=2 ** -11, atol=0)


@gpu
def test_gpu_bad_arguments(gptqkit):
    packed = random_packed_layer(gptqkit, 64, 128, 4, 32)
    lay = _layout(gptqkit, packed, device="cuda")
    with pytest.raises(ValueError, match="expected a tensor on"):
        _call(lay, torch.randn(2, 128).half())  # x on the CPU, layer on the GPU
    with pytest.raises(ValueError, match="x: expected dtype"):
        _call(lay, torch.randn(2, 128, device="cuda"))
    from gptqkit._native import _C

    y = torch.empty(2, 64, dtype=torch.float16, device="cuda")
    x = torch.randn(2, 128, device="cuda").half()
    with pytest.raises(ValueError, match="w.qweight: expected shape"):
        _C.gpu_quantized_matmul(x, lay.qweight[:4], lay.sz, lay.chunk_group, None, None, y, 4, 128, 64, 0)
    with pytest.raises(ValueError, match="y: expected shape"):
        _C.gpu_quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, None, None, y[:1], 4, 128, 64, 0)
    with pytest.raises(ValueError, match="non-contiguous|C-contiguous"):
        xt = torch.randn(128, 2, device="cuda").half().t()
        _C.gpu_quantized_matmul(xt, lay.qweight, lay.sz, lay.chunk_group, None, None, y, 4, 128, 64, 0)


@gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_cuda_graph_capture(gptqkit, m):
    packed = random_packed_layer(gptqkit, 256, 512, 4, 128, act_order=True)
    lay = _layout(gptqkit, packed, device="cuda")
    x = torch.randn(m, 512, device="cuda").half()
    _call(lay, x)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = _call(lay, x)
    x.copy_(torch.randn(m, 512, device="cuda").half())
    graph.replay()
    torch.cuda.synchronize()
    w = _oracle(packed).double()
    ref = x.cpu().double() @ w.T
    assert ((y.cpu().double() - ref).abs() <= _bound(x.cpu(), w, ref, torch.float16)).all()


@gpu
def test_gpu_cuda_graph_capture_in_a_cold_process():
    """The first launch of a kernel inside a capture (no warm-up): with lazy module loading
    (CUDA 12.2+ default) the kernel is loaded during the capture, which older drivers refuse."""
    script = """
import sys
import torch
import gptqkit
from gptqkit import ops
sys.path.insert(0, "tests/python")
from packed_layers import random_packed_layer
packed = random_packed_layer(gptqkit, 256, 320, 3, 64, act_order=True)
lay = ops.prepare_layout(packed.qweight, packed.qzeros, packed.scales, packed.g_idx, packed.bits, packed.format,
                         dtype=torch.bfloat16, device="cuda")
x = torch.randn(6, 320, device="cuda", dtype=torch.bfloat16)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    y = torch.ops.gptqkit.quantized_matmul(x, lay.qweight, lay.sz, lay.chunk_group, lay.perm, None, lay.bits,
                                           lay.in_features, lay.out_features)
graph.replay()
torch.cuda.synchronize()
ref = x.double().cpu() @ torch.as_tensor(packed.dequantize()).double().T
assert (y.double().cpu() - ref).abs().max() < 0.05 * ref.abs().max(), "wrong result"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=_REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@gpu
def test_quant_linear_on_cuda(gptqkit):
    from gptqkit.nn import QuantLinear

    packed = random_packed_layer(gptqkit, 300, 256, 4, 64, act_order=True)
    layer = QuantLinear.from_packed(packed, bias=torch.randn(300).half(), group_size=64)
    keys = set(layer.state_dict())
    x = torch.randn(2, 3, 256).half()
    ref = layer(x.float()).double()  # the CPU kernels
    layer = layer.to("cuda")
    assert "_gpu_layout" in layer.__dict__ and set(layer.state_dict()) == keys
    y = layer(x.cuda())
    assert y.shape == (2, 3, 300) and y.dtype == torch.float16
    torch.testing.assert_close(y.cpu().double(), ref, rtol=4e-3, atol=4e-3)
    y32 = layer(x.cuda().float())
    assert y32.dtype == torch.float32
    yb = layer(x.cuda().bfloat16())
    torch.testing.assert_close(yb.cpu().double(), ref, rtol=3e-2, atol=3e-2)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x.cuda()), y)
    # back on the CPU, the CPU kernels again
    layer = layer.cpu()
    assert "_gpu_layout" not in layer.__dict__
    torch.testing.assert_close(layer(x.float()).double(), ref)


@gpu
@pytest.mark.parametrize("m", [1, 16, 1024])
def test_quant_linear_on_cuda_backward(gptqkit, monkeypatch, m):
    """Inputs that require grad (training adapters, any forward outside no_grad) on every path."""
    from gptqkit.nn import QuantLinear

    monkeypatch.setenv("GPTQKIT_GPU_DENSE_MIN_ROWS", "1024")
    packed = random_packed_layer(gptqkit, 200, 256, 4, 64)
    layer = QuantLinear.from_packed(packed, bias=torch.randn(200).half(), group_size=64).to("cuda")
    x = torch.randn(m, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    w = _oracle(packed).double()
    grad_ref = (2 * y.detach().double()) @ w.to("cuda")
    torch.testing.assert_close(x.grad.double(), grad_ref, rtol=2e-2, atol=2e-2)


@gpu
def test_quant_linear_shares_qweight_without_act_order(gptqkit):
    from gptqkit.nn import QuantLinear

    layer = QuantLinear.from_packed(random_packed_layer(gptqkit, 256, 512, 4, 128), group_size=128).to("cuda")
    assert layer.__dict__["_gpu_layout"].qweight.data_ptr() == layer.qweight.data_ptr()


@gpu
@pytest.mark.parametrize("desc_act", [False, True], ids=["sequential", "act-order"])
def test_from_quantized_on_cuda_and_generate_command(gptqkit, tmp_path, desc_act):
    """A saved checkpoint loaded with from_quantized(device="cuda") runs every quantized layer in the
    GPU kernels and gives the CPU model's logits; ``gptqkit generate --device cuda`` gives the
    library's own greedy tokens on that model."""
    import json

    from cli_runner import run_cli
    from tiny_models import make_tiny_model, make_tiny_tokenizer

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.nn import QuantLinear

    q = GPTQForCausalLM(make_tiny_model("llama"), QuantizeConfig(bits=4, group_size=32, desc_act=desc_act),
                        tokenizer=make_tiny_tokenizer())
    q.quantize(torch.randint(4, 100, (4, 32), generator=torch.Generator().manual_seed(0)), progress=False)
    q.save_quantized(tmp_path / "ckpt")
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    cpu = GPTQForCausalLM.from_quantized(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    gpu = GPTQForCausalLM.from_quantized(tmp_path / "ckpt", device="cuda", dtype=torch.float16)
    layers = [m for m in gpu.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all("_gpu_layout" in m.__dict__ and m.qweight.device.type == "cuda" for m in layers)
    with torch.inference_mode():
        ref = cpu(ids).logits.double()
        got = gpu(ids.cuda()).logits.double().cpu()
    assert float((got - ref).abs().max()) <= 2e-2 * float(ref.abs().max())

    prompt = gpu.tokenizer("hello world", return_tensors="pt")["input_ids"].cuda()
    with torch.inference_mode():
        want = gpu.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                            do_sample=False, pad_token_id=gpu.tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
    status, out, err = run_cli(["generate", tmp_path / "ckpt", "hello world", "--device", "cuda", "--dtype",
                                "float16", "--max-new-tokens", "8", "--json", "-q", "--no-fuse"])
    assert status == 0, err
    result = json.loads(out)
    assert result["device"] == "cuda" and result["new_token_ids"] == want


def test_eager_inference_bypasses_the_dispatcher_and_nothing_else_does(gptqkit):
    """No-grad eager calls run the op's function directly (the dispatcher's autograd wrapper costs
    tens of microseconds per call under no_grad); calls that need a gradient, and traced ones, go
    through the op. Same results either way (here on a CPU copy of the layout)."""
    from torch.profiler import ProfilerActivity, profile

    from gptqkit import ops
    from gptqkit.nn import QuantLinear

    packed = random_packed_layer(gptqkit, 40, 96, 4, 32, act_order=True)
    layer = QuantLinear.from_packed(packed, bias=torch.randn(40).half(), group_size=32)
    layer.__dict__["_gpu_layout"] = _layout(gptqkit, packed)
    x = torch.randn(3, 96).half()

    def op_calls(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        return out, sum(e.count for e in prof.key_averages() if e.key == "gptqkit::quantized_matmul")

    with torch.no_grad():
        direct, n_direct = op_calls(lambda: layer._gpu_forward(x))
    with torch.inference_mode():
        _, n_inference = op_calls(lambda: layer._gpu_forward(x))
    xg = x.clone().requires_grad_(True)
    through_op, n_grad = op_calls(lambda: layer._gpu_forward(xg))
    assert (n_direct, n_inference, n_grad) == (0, 0, 1)
    torch.testing.assert_close(direct, through_op.detach(), rtol=0, atol=0)
    through_op.float().sum().backward()  # the op's backward formula is still there
    assert xg.grad is not None and xg.grad.shape == x.shape
    assert not ops.can_bypass_dispatcher(torch.empty(2, 2, device="meta").as_subclass(torch.nn.Parameter), None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not ops.can_bypass_dispatcher(mode.from_tensor(x), None)


@gpu
def test_fused_projections_on_cuda_compile_and_capture(gptqkit):
    """A tiny Llama with random 4-bit layers on the GPU: fused q/k/v and gate/up give the unfused
    logits (the kernels may split K differently for the wider layer), one fused GEMM per group
    under torch.compile(fullgraph) with CUDA graphs, and unfusing restores the exact tensors."""
    from test_fusion import _quantize_randomly
    from tiny_models import make_tiny_model

    from gptqkit.nn import fuse_projections, unfuse_projections

    model = _quantize_randomly(gptqkit, make_tiny_model("llama", hidden_size=256, intermediate_size=512,
                                                        num_attention_heads=8, num_key_value_heads=2),
                               group_size=128).half().cuda()
    ids = torch.randint(4, 100, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits.float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(fuse_projections(model)) == 4
    with torch.inference_mode():
        got = model(ids).logits.float()
    assert float((got - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    step = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.inference_mode():
        for _ in range(3):  # compile, record, replay
            compiled = step(ids[:, :1]).logits.float()
        eager = model(ids[:, :1]).logits.float()
    assert float((compiled - eager).abs().max()) <= 1e-2 * float(eager.abs().max())
    unfuse_projections(model)
    after = model.state_dict()
    assert sorted(after) == sorted(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_quant_linear_gpu_forward_compiles_without_graph_breaks(gptqkit):
    """QuantLinear's GPU branch is plain Python around the op; run here on a CPU copy of the layout."""
    from gptqkit.nn import QuantLinear

    packed = random_packed_layer(gptqkit, 40, 96, 4, 32, act_order=True)
    layer = QuantLinear.from_packed(packed, bias=torch.randn(40).half(), group_size=32)
    layer.__dict__["_gpu_layout"] = _layout(gptqkit, packed)  # what .to("cuda") makes, left on the CPU
    x = torch.randn(2, 3, 96).half()
    eager = layer._gpu_forward(x)
    assert eager.shape == (2, 3, 40) and eager.dtype == torch.float16
    torch.testing.assert_close(eager.float(), layer(x.float()), rtol=2e-3, atol=2e-3)
    compiled = torch.compile(layer._gpu_forward, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    torch.testing.assert_close(compiled(x.bfloat16()).float(), eager.float(), rtol=2e-2, atol=2e-2)


# ============================================================================ CPU emulation of the kernels
# tests/gpu_emulation/emulate_gemm.cpp compiles the kernel sources
# (cuda/src/*_kernel.cuh, unmodified) as C++ with every GPU thread a
# cooperative fiber, __syncthreads a yield, and the warp collectives (shuffles,
# ldmatrix, mma.sync, cp.async landing as late as allowed) emulated lane by
# lane. It checks the kernels' indexing, staging, reductions and fragment
# layouts on a machine without a GPU; it says nothing about speed.

import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EMU_VARIANTS = {"warp32": ["-DEMU_WARP=32"], "warp64": ["-DEMU_WARP=64"],
                 "tensorcores": ["-DEMU_WARP=32", "-DEMU_TC=1"]}


@pytest.fixture(scope="module")
def emulators():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    sources = [os.path.join(_REPO, "tests", "gpu_emulation", f)
               for f in ("emulate_gemm.cpp", "emu_compat.h", "emu_runtime.h")]
    sources += [os.path.join(_REPO, "cuda", "src", f) for f in ("gemm_common.cuh", "gemm_gemv_kernel.cuh",
                                                                "gemm_tiled_kernel.cuh", "gemm_dequant_kernel.cuh",
                                                                "gpu_gemm_api.h")]
    sources.append(os.path.join(_REPO, "cpp", "src", "half.h"))
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in sources)).hexdigest()[:16]
    out_dir = os.path.join(_REPO, "build", "gpu-emulation", digest)
    os.makedirs(out_dir, exist_ok=True)
    procs, paths = {}, {}
    for name, flags in _EMU_VARIANTS.items():
        paths[name] = os.path.join(out_dir, f"emulate_gemm_{name}")
        if os.path.exists(paths[name]):
            continue
        cmd = [cxx, "-std=c++20", "-O1", *flags,
               "-I" + os.path.join(_REPO, "tests", "gpu_emulation"), "-I" + os.path.join(_REPO, "cuda", "src"),
               "-I" + os.path.join(_REPO, "cpp", "include"), "-I" + os.path.join(_REPO, "cpp", "src"),
               sources[0], "-o", paths[name] + ".tmp"]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        out = proc.communicate()[0].decode(errors="replace")
        if proc.returncode != 0:
            pytest.fail(f"compiling the kernel emulation ({name}) failed:\n{out[-4000:]}")
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def _emulate(binary, tmp_path, kernel, lay, x=None, bias=None, lanes=4, mf=1):
    """Runs one kernel launch in the emulator; returns the raw 16-bit result as a torch tensor of sz's dtype."""
    bf16 = lay.sz.dtype == torch.bfloat16
    m = 0 if x is None else x.shape[0]
    chunks, np_ = lay.chunk_group.shape[0], lay.qweight.shape[1]
    head = np.array([kernel, int(bf16), lay.bits, m, lay.in_features, lay.out_features, np_, chunks,
                     lay.sz.shape[0], int(lay.perm is not None), int(bias is not None), lanes, mf], dtype=np.int64)

    def raw16(t):
        return t.contiguous().view(torch.int16).numpy().tobytes()

    parts = [head.tobytes(), b"" if x is None else raw16(x), lay.qweight.numpy().tobytes(), raw16(lay.sz),
             lay.chunk_group.numpy().tobytes()]
    if lay.perm is not None:
        parts.append(lay.perm.numpy().tobytes())
    if bias is not None:
        parts.append(raw16(bias))
    job, result = tmp_path / "job.bin", tmp_path / "out.bin"
    job.write_bytes(b"".join(parts))
    run = subprocess.run([binary, str(job), str(result)], capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    shape = (lay.out_features, lay.in_features) if kernel == 2 else (m, lay.out_features)
    raw = torch.from_numpy(np.frombuffer(result.read_bytes(), dtype=np.int16).copy()).view(lay.sz.dtype)
    return raw.reshape(shape)


def _check_emulated(y, x, packed, bias, dtype):
    w = _oracle(packed).double()
    ref = x.double() @ w.T + (bias.double() if bias is not None else 0)
    assert not torch.isnan(y).any(), "output elements left unwritten"
    err = (y.double() - ref).abs()
    bound = _bound(x, w, ref, dtype)
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("variant", ["warp32", "warp64"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, True), (128, False)])
@pytest.mark.parametrize("m,lanes", [(1, 4), (3, 32), (8, 8)])
def test_emulated_gemv(gptqkit, emulators, tmp_path, variant, bits, group_size, act_order, m, lanes):
    dtype = torch.bfloat16 if bits % 2 else torch.float16
    n, k = 203, 333
    packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order=act_order, seed=bits + m)
    lay = _layout(gptqkit, packed, dtype=dtype)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if m != 3 else None
    y = _emulate(emulators[variant], tmp_path, 0, lay, x, bias, lanes=lanes)
    _check_emulated(y, x, packed, bias, dtype)


@pytest.mark.parametrize("variant", ["warp32", "tensorcores"])
@pytest.mark.parametrize("bits,group_size,act_order,k", [(4, 128, False, 320), (4, 32, True, 333), (2, -1, False, 333),
                                                         (3, 32, False, 320), (8, 128, True, 333)])
@pytest.mark.parametrize("m,mf", [(9, 1), (33, 1), (70, 4)])
def test_emulated_tiled(gptqkit, emulators, tmp_path, variant, bits, group_size, act_order, k, m, mf):
    dtype = torch.bfloat16 if (bits + m) % 2 else torch.float16
    n = 203
    packed = random_packed_layer(gptqkit, n, k, bits, group_size, act_order=act_order, seed=bits + m)
    lay = _layout(gptqkit, packed, dtype=dtype)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if m != 33 else None
    y = _emulate(emulators[variant], tmp_path, 1, lay, x, bias, mf=mf)
    _check_emulated(y, x, packed, bias, dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order,k", [(True, 333), (False, 320), (False, 333)])  # perm / 16-byte rows / odd K
def test_emulated_dequantize(gptqkit, emulators, tmp_path, bits, act_order, k):
    packed = random_packed_layer(gptqkit, 70, k, bits, 32, act_order=act_order, seed=bits)
    lay = _layout(gptqkit, packed)
    w = _emulate(emulators["warp32"], tmp_path, 2, lay)
    torch.testing.assert_close(w.float(), _oracle(packed), rtol=2 ** -11, atol=0)


def test_native_prepare_needs_perm_when_reordered(gptqkit):
    from gptqkit._native import _C

    p = random_packed_layer(gptqkit, 24, 64, 4, 32, act_order=True)
    q, z, s, g = (torch.as_tensor(t) for t in (p.qweight, p.qzeros, p.scales, p.g_idx))
    shape = _C.gpu_gemm_shape(g, 24, 2, 4)
    assert shape["reordered"] and shape["positions"] == 64
    with pytest.raises(ValueError, match="out.perm: the layout is reordered"):
        _C.prepare_gpu_weight(q, z, s, g, 4, "v1", torch.empty(8, 128, dtype=torch.int32),
                              torch.empty(2, 128, 2).half(), torch.empty(2, dtype=torch.int32), None)
