"""Perplexity and KL divergence on WikiText-style text, window by window.

The standard GPTQ evaluation: the text file is prepared the WikiText way
(CRLF normalised to LF, split into lines, joined with ``"\\n\\n"``), tokenized
without special tokens (no BOS), cut into non-overlapping windows of
``seqlen`` tokens (the remainder is dropped), and the first ``windows`` of them
are scored. Perplexity is ``exp`` of the mean next-token negative
log-likelihood over the ``seqlen - 1`` predicted tokens of every window
(identical to GPTQ's ``exp(sum(loss_i * seqlen) / (W * seqlen))``, as all
windows have the same length).

:func:`kl_divergence` compares a quantized model against its reference on the
same windows: the mean over those predicted positions of
``KL(p_ref || p_q) = sum_v p_ref(v) (log p_ref(v) - log p_q(v))``, which reacts
to quantization damage long before perplexity does. Both models run window by
window, so only one window's logits of each are alive at a time.

Models are anything callable on a ``[batch, seqlen]`` LongTensor: a
transformers model (called as ``model(input_ids=..., use_cache=False)``), a
wrapper with a ``generate`` method or an ``nn.Module`` (called the same way),
or a plain function ``f(input_ids)``. The result may be the logits, an output
with ``.logits`` or a tuple whose first element is the logits.

Example::

    from gptqkit.evaluation import perplexity, kl_divergence
    r = perplexity(model, tok, "../shared/data/wikitext-2/wiki.test.raw", seqlen=512, windows=40)
    r.ppl                                      # 29.01 for SmolLM2-135M in fp32
    k = kl_divergence(fp_model, q_model, tok, "../shared/data/wikitext-2/wiki.test.raw",
                      seqlen=512, windows=40)
    k.kl, k.ppl_ref, k.ppl_q
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["KLResult", "PerplexityResult", "eval_windows", "kl_divergence", "load_eval_tokens", "perplexity"]


@dataclass
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    Attributes:
        ppl: perplexity, ``exp(nll)``.
        nll: mean negative log-likelihood per predicted token (nats).
        tokens: number of predicted tokens scored (``windows * (seqlen - 1)``).
        windows: number of windows scored.
        seqlen: window length.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


@dataclass
class KLResult:
    """Outcome of :func:`kl_divergence`.

    Attributes:
        kl: mean ``KL(p_ref || p_q)`` per predicted position (nats).
        kl_max: largest per-window mean KL (spots a single broken window).
        ppl_ref: reference model's perplexity on the same windows.
        ppl_q: compared model's perplexity on the same windows.
        tokens: predicted positions scored.
        windows: windows scored.
        seqlen: window length.
    """

    kl: float
    kl_max: float
    ppl_ref: float
    ppl_q: float
    tokens: int
    windows: int
    seqlen: int


def load_eval_tokens(path: Union[str, os.PathLike], tokenizer: Any) -> torch.Tensor:
    """The 1-d token stream of a text file, prepared the WikiText way, without BOS.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no text.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation text {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    lines = raw.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":      # the file's final newline ends the last line, it adds none
        lines.pop()
    text = "\n\n".join(lines)
    if not text.strip():
        raise ValueError(f"evaluation text {path!r} is empty")
    from gptqkit.calibration import _tokenize_long
    return _tokenize_long(tokenizer, text)


def eval_windows(tokens: torch.Tensor, seqlen: int, windows: Optional[int] = None) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows ``[W, seqlen]`` of a 1-d token stream.

    Raises:
        ValueError: ``seqlen`` < 2, or fewer than ``windows`` (or no) full windows.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen: expected an integer >= 2, got {seqlen!r}")
    tokens = tokens.reshape(-1)
    avail = tokens.numel() // seqlen
    if avail == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, less than one window of {seqlen}")
    if windows is None:
        windows = avail
    if isinstance(windows, bool) or not isinstance(windows, int) or windows <= 0:
        raise ValueError(f"windows: expected a positive integer or None, got {windows!r}")
    if windows > avail:
        raise ValueError(f"windows={windows} requested but the text has only {avail} windows of {seqlen} tokens")
    return tokens[: windows * seqlen].reshape(windows, seqlen)


def _device_of(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return _device_of(inner)
    dev = getattr(model, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.nn.Module) or hasattr(model, "generate"):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; expected logits, an output with .logits "
                        f"or a tuple starting with the logits")
    return logits


def _window_batches(win: torch.Tensor, batch_size: int):
    for s in range(0, win.shape[0], batch_size):
        yield win[s:s + batch_size]


class _ModeGuard:
    """Puts nn.Modules in eval mode for the duration, restoring their training flag."""

    def __init__(self, *models):
        self.mods = [m for m in models if isinstance(m, torch.nn.Module)]
        self.flags = []

    def __enter__(self):
        self.flags = [m.training for m in self.mods]
        for m in self.mods:
            m.eval()

    def __exit__(self, *exc):
        for m, f in zip(self.mods, self.flags):
            m.train(f)


def _prepare(tokenizer, text_file, tokens, seqlen, windows):
    if tokens is None:
        if text_file is None:
            raise ValueError("pass text_file (with a tokenizer) or tokens")
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to read text_file")
        tokens = load_eval_tokens(text_file, tokenizer)
    elif not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens, dtype=torch.long)
    return eval_windows(tokens.to(torch.long), seqlen, windows)


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="win", disable=not enabled, leave=False)


def perplexity(
    model: Union[torch.nn.Module, Callable],
    tokenizer: Any = None,
    text_file: Optional[Union[str, os.PathLike]] = None,
    *,
    tokens: Optional[torch.Tensor] = None,
    seqlen: int = 512,
    windows: Optional[int] = None,
    batch_size: int = 1,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` over the first ``windows`` windows of ``seqlen`` tokens.

    Args:
        model: a causal LM or callable (see the module docs).
        tokenizer: used to tokenize ``text_file``.
        text_file: the evaluation text, e.g. ``../shared/data/wikitext-2/wiki.test.raw``.
        tokens: a pre-tokenized 1-d stream instead of ``text_file``.
        seqlen: window length in tokens.
        windows: number of windows (default: all full windows).
        batch_size: windows per forward call.
        device: where to put the input ids (default: the model's device).
        progress: show a tqdm bar.

    Raises:
        FileNotFoundError / ValueError: missing or too-short text, bad arguments.
    """
    win = _prepare(tokenizer, text_file, tokens, seqlen, windows)
    dev = torch.device(device) if device is not None else _device_of(model)
    total_nll, count = 0.0, 0
    with _ModeGuard(model), torch.inference_mode(), _progress(win.shape[0], "perplexity", progress) as bar:
        for chunk in _window_batches(win, batch_size):
            ids = chunk.to(dev)
            logits = _logits(model, ids)[:, :-1].float()
            target = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total_nll += float(nll)
            count += target.numel()
            bar.update(chunk.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total_nll / count):.3f}")
    nll = total_nll / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=int(win.shape[0]), seqlen=seqlen)


def kl_divergence(
    ref_model: Union[torch.nn.Module, Callable],
    model: Union[torch.nn.Module, Callable],
    tokenizer: Any = None,
    text_file: Optional[Union[str, os.PathLike]] = None,
    *,
    tokens: Optional[torch.Tensor] = None,
    seqlen: int = 512,
    windows: Optional[int] = None,
    batch_size: int = 1,
    device: Optional[Union[str, torch.device]] = None,
    ref_device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> KLResult:
    """Mean ``KL(p_ref || p_q)`` of next-token distributions, plus both perplexities.

    Both models see the same windows; for each window the reference's and the
    compared model's logits are computed, compared and freed before the next
    window, so memory stays at one window's logits per model. Positions are
    the ``seqlen - 1`` predicted ones of each window (those perplexity scores).

    Args:
        ref_model: the reference (e.g. the fp32 model).
        model: the model to compare (e.g. the quantized one).
        tokenizer, text_file, tokens, seqlen, windows, batch_size, progress:
            as in :func:`perplexity`.
        device: input device for ``model`` (default: its own).
        ref_device: input device for ``ref_model`` (default: its own).
    """
    win = _prepare(tokenizer, text_file, tokens, seqlen, windows)
    dev = torch.device(device) if device is not None else _device_of(model)
    rdev = torch.device(ref_device) if ref_device is not None else _device_of(ref_model)
    kl_sum, nll_ref, nll_q, count, kl_max = 0.0, 0.0, 0.0, 0, 0.0
    with _ModeGuard(ref_model, model), torch.inference_mode(), _progress(win.shape[0], "KL divergence", progress) as bar:
        for chunk in _window_batches(win, batch_size):
            target = chunk[:, 1:].reshape(-1)
            lp_ref = torch.log_softmax(_logits(ref_model, chunk.to(rdev))[:, :-1].float(), dim=-1)
            lp_ref = lp_ref.reshape(-1, lp_ref.shape[-1]).cpu()
            lp_q = torch.log_softmax(_logits(model, chunk.to(dev))[:, :-1].float(), dim=-1)
            lp_q = lp_q.reshape(-1, lp_q.shape[-1]).cpu()
            # per position: sum_v p_ref (log p_ref - log p_q)
            kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
            per_window = kl.reshape(chunk.shape[0], -1).mean(-1)
            kl_max = max(kl_max, float(per_window.max()))
            kl_sum += float(kl.sum())
            nll_ref -= float(lp_ref.gather(1, target[:, None]).sum())
            nll_q -= float(lp_q.gather(1, target[:, None]).sum())
            count += target.numel()
            del lp_ref, lp_q, kl
            bar.update(chunk.shape[0])
            bar.set_postfix(kl=f"{kl_sum / count:.4f}")
    return KLResult(kl=kl_sum / count, kl_max=kl_max, ppl_ref=math.exp(nll_ref / count),
                    ppl_q=math.exp(nll_q / count), tokens=count, windows=int(win.shape[0]), seqlen=seqlen)
