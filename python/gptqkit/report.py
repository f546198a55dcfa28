"""What :meth:`gptqkit.GPTQForCausalLM.quantize` reports: per layer and for the run."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import List, Optional

#: share of a block's parameters outside Linear-like layers above which quantize() warns
NOT_LINEAR_WARN_SHARE = 0.05


@dataclass
class LayerReport:
    """What quantizing one layer did."""

    name: str
    shape: tuple  # (out_features, in_features)
    bits: int
    group_size: int
    loss: float
    damp: float
    damp_attempts: int
    seconds: float
    #: calibration tokens its Hessian was built from (an MoE expert sees only those routed to it)
    tokens: Optional[int] = None
    #: rounded to nearest: an expert that calibration routed no token to (see gptqkit.moe)
    rtn_fallback: bool = False
    #: asymmetric calibration (``gptaq``): ``||W0 - W|| / ||W||`` of the shifted target; None without it
    target_shift: Optional[float] = None


@dataclass
class QuantizeReport:
    """Summary of :meth:`GPTQForCausalLM.quantize`."""

    layers: List[LayerReport] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    #: matrix-shaped weights of the blocks that are not in Linear-like layers (so stay unquantized),
    #: named as in one block, and their share of the blocks' parameters
    not_linear: List[str] = field(default_factory=list)
    not_linear_share: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    #: passes over the calibration data added to keep a group's Hessians under ``hessian_memory``
    extra_passes: int = 0

    def summary(self) -> str:
        n = len(self.layers)
        if n == 0:
            return "no layer was quantized"
        worst = max(self.layers, key=lambda r: r.loss)
        retried = [r.name for r in self.layers if r.damp_attempts > 1]
        lines = [
            f"quantized {n} layers ({len(self.skipped)} skipped) on {self.tokens} calibration tokens "
            f"in {self.seconds:.1f} s; peak RSS {self.peak_rss_mb:.0f} MB",
            f"GPTQ loss: total {sum(r.loss for r in self.layers):.4g}, largest {worst.loss:.4g} ({worst.name})",
        ]
        if self.not_linear_share >= NOT_LINEAR_WARN_SHARE:
            lines.append(f"{self.not_linear_share:.0%} of the blocks' weights are not in Linear layers and stay "
                         f"unquantized: {', '.join(self.not_linear[:4])}" + (" ..." if len(self.not_linear) > 4 else ""))
        if self.extra_passes:
            lines.append(f"{self.extra_passes} extra pass(es) over the calibration data kept the Hessians of a "
                         f"group under hessian_memory")
        fallback = [r for r in self.layers if r.rtn_fallback]
        if fallback:
            lines.append(f"{len(fallback)} expert layer(s) got no calibration token and were rounded to nearest "
                         f"(more calibration data reaches more experts): " + ", ".join(r.name for r in fallback[:4])
                         + (" ..." if len(fallback) > 4 else ""))
        if retried:
            lines.append(f"damping was raised for {len(retried)} layer(s): {', '.join(retried[:5])}"
                         + (" ..." if len(retried) > 5 else ""))
        return "\n".join(lines)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
