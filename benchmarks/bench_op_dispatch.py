"""Per-call cost of reaching gptqkit's GPU GEMM from eager PyTorch: the custom op against a direct call.

``QuantLinear`` on a GPU calls ``torch.ops.gptqkit.quantized_matmul`` (a
``torch.library`` custom op, so that ``torch.compile`` and CUDA graphs see
one opaque node). In eager mode the dispatcher's way into a Python custom op
with a registered backward costs far more under ``torch.no_grad()`` (what
transformers' ``generate`` runs in) than under ``torch.inference_mode()``,
so eager inference calls the op's function directly when nothing needs a
gradient (``gptqkit.ops.can_bypass_dispatcher``).

Two measurements, in the same run:

* **dispatch alone** (any machine): a do-nothing custom op with the same
  signature, registered the same way (fake implementation, autograd formula),
  called through ``torch.ops`` and directly, under ``no_grad`` and
  ``inference_mode``; the peer is ``torch.empty`` of the output (what the
  real call allocates anyway).
* **whole layer** (GPU builds with a GPU): a 4096 x 4096 int4 ``QuantLinear``
  at M = 1 in eager mode, direct and through the op, against fp16
  ``F.linear``: the time per call of a stream of calls, synchronised at the
  end, i.e. the slower of the host's Python and the GPU's kernel, which is
  what eager decoding pays.

    python benchmarks/bench_op_dispatch.py
"""

from __future__ import annotations

import argparse
import sys
import timeit
from typing import Optional

import torch


def _probe_op():
    @torch.library.custom_op("gptqkit_bench::probe_matmul", mutates_args=())
    def probe(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, chunk_group: torch.Tensor,
              perm: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, in_features: int,
              out_features: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features))

    @probe.register_fake
    def _(x, qweight, sz, chunk_group, perm, bias, bits, in_features, out_features):
        return x.new_empty((x.shape[0], out_features))

    def backward(ctx, grad):
        return (grad,) + (None,) * 8

    probe.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
    return probe


def _per_call_us(fn, number):
    fn()
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def dispatch_alone(number):
    probe = _probe_op()
    direct = probe._init_fn  # the Python function behind the op
    x, w = torch.randn(1, 4096), torch.zeros(512, 4096, dtype=torch.int32)
    sz, cg = torch.zeros(32, 4096, 2), torch.zeros(128, dtype=torch.int32)
    args = (x, w, sz, cg, None, None, 4, 4096, 4096)
    rows = []
    for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with ctx():
            rows.append((mode, _per_call_us(lambda: torch.ops.gptqkit_bench.probe_matmul(*args), number),
                         _per_call_us(lambda: direct(*args), number),
                         _per_call_us(lambda: torch.empty((1, 4096)), number)))
    print("dispatch alone (a do-nothing custom op of QuantLinear's signature), host us per call:")
    print("| grad mode | through torch.ops | direct call | torch.empty (peer) | op / direct |")
    print("|---|---:|---:|---:|---:|")
    for mode, op, d, e in rows:
        print(f"| {mode} | {op:.1f} | {d:.1f} | {e:.1f} | {op / d:.1f}x |")


def whole_layer(number):
    from gptqkit import ops
    from gptqkit.nn import QuantLinear

    if ops.gpu_unavailable_reason() is not None:
        print(f"\nwhole layer: skipped ({ops.gpu_unavailable_reason()})")
        return
    layer = QuantLinear(4, 128, 4096, 4096, bias=False, device="cuda")
    layer.qzeros.fill_(0x77777777)
    layer.scales.fill_(0.01)
    layer.prepare_gpu_weight()
    dense = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    real = ops.can_bypass_dispatcher

    def per_call_us(fn):
        fn()
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = timeit.default_timer()
            for _ in range(number):
                fn()
            torch.cuda.synchronize()
            best = min(best, (timeit.default_timer() - t0) / number * 1e6)
        return best

    results = {}
    with torch.no_grad():
        results["fp16 F.linear (peer)"] = per_call_us(lambda: torch.nn.functional.linear(x, dense))
        results["QuantLinear, direct"] = per_call_us(lambda: layer(x))
        ops.can_bypass_dispatcher = lambda *a: False
        try:
            results["QuantLinear, through torch.ops"] = per_call_us(lambda: layer(x))
        finally:
            ops.can_bypass_dispatcher = real
    print(f"\nwhole layer on {torch.cuda.get_device_name()}: 4096 x 4096 int4, M = 1, eager, torch.no_grad(), "
          f"us per call in a stream of calls:")
    peer = results["fp16 F.linear (peer)"]
    for name, t in results.items():
        print(f"| {name} | {t:.1f} | {peer / t:.2f}x the speed of the fp16 call |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--number", type=int, default=2000, help="calls per timing (best of 5)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}")
    dispatch_alone(args.number)
    whole_layer(args.number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
