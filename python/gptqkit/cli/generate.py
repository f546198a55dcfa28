"""``gptqkit generate``: text from a GPTQ checkpoint (or a full-precision model), streamed as it
is produced, with the time to the first token and the decode speed."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List

from gptqkit.cli._common import (
    DTYPES, CLIError, UsageError, _check_device, _check_input_file, _check_model_arg, _check_tokenizer_arg,
    _HelpFormatter, _log, _nonneg_int, _positive_int,
)
from gptqkit.cli.evaluate import load_model

GENERATE_DESCRIPTION = """\
Continue a prompt with MODEL_OR_CHECKPOINT and print the text as it is
produced.

MODEL_OR_CHECKPOINT is a GPTQ checkpoint (gptqkit's, AutoGPTQ's or
GPTQModel's; its quantized layers run in gptqkit's packed low-bit kernels) or
a full-precision model folder / hub id, so the same command shows what
quantization changed. The prompt is PROMPT, --prompt-file FILE, or standard
input when PROMPT is "-". With --chat it is sent as one user message through
the tokenizer's chat template (instruction-tuned models).

Decoding is greedy by default (the same text on every run); --temperature > 0
samples, with --top-p / --top-k and --seed. Generation stops at the model's
end-of-sequence token or after --max-new-tokens.

The generated text goes to standard output; the figures (prompt tokens, time
to the first new token, which includes the prompt's forward pass, and the
decode speed of the tokens after it) go to standard error, so that
'gptqkit generate ... > out.txt' keeps only the text. --json prints
everything as one JSON object instead, token ids included."""

GENERATE_EPILOG = """\
examples:
  gptqkit generate out/smollm2-4bit "The capital of France is" --max-new-tokens 20
  gptqkit generate out/smollm2-4bit "Write a haiku about rain." --chat
  gptqkit generate ~/models/SmolLM2-135M "The capital of France is"   # the original, to compare
  echo "Once upon a time" | gptqkit generate out/smollm2-4bit - --temperature 0.8 --seed 1
  gptqkit generate out/smollm2-4bit --prompt-file prompt.txt --json

decode speed on a CPU comes from gptqkit's packed int4 kernels; see
benchmarks/bench_cpu_generate.py for a comparison with the fp32 model."""


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_parser(sub, common) -> None:
    """Registers ``generate`` on the sub-command parsers ``sub``."""
    p = sub.add_parser("generate", parents=[common], formatter_class=_HelpFormatter,
                       help="continue a prompt with a GPTQ checkpoint (or a full-precision model)",
                       description=GENERATE_DESCRIPTION, epilog=GENERATE_EPILOG)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a GPTQ checkpoint folder, or a full-precision model folder / hub id")
    p.add_argument("prompt", metavar="PROMPT", nargs="?",
                   help="the text to continue; '-' reads it from standard input")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (UTF-8) instead of PROMPT")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                   help="most tokens to generate (default: 64)")
    p.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy decoding (default: 0)")
    p.add_argument("--top-p", type=_top_p, default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this total probability "
                        "(with --temperature > 0; default: 1.0, all)")
    p.add_argument("--top-k", type=_nonneg_int, default=0, metavar="K",
                   help="sample among the K most likely tokens only; 0 = no limit (with --temperature > 0; "
                        "default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default: 0)")
    p.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="where the model runs (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of the non-quantized weights and activations; auto = as stored (default: float32)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder or hub id (default: the model's own)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="run a checkpoint's q/k/v and gate/up layers as separate GEMMs (default: fused into one "
                        "GEMM per group of siblings that read the same input; same results, fewer kernel calls)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (prompt, text, token ids, timings) instead of streaming the text")
    p.set_defaults(func=cmd_generate, adopt_extras=_adopt_prompt)


def _adopt_prompt(args, extras: List[str]) -> bool:
    """argparse gives an optional positional (PROMPT) nothing when options stand between it and
    MODEL (``generate ckpt --max-new-tokens 20 "Hello"``) and leaves it over: take it as PROMPT."""
    if args.prompt is None and len(extras) == 1 and (extras[0] == "-" or not extras[0].startswith("-")):
        args.prompt = extras[0]
        return True
    return False


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("pass PROMPT or --prompt-file, not both")
    if args.prompt_file is not None:
        path = _check_input_file(args.prompt_file, "--prompt-file")
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompt-file {args.prompt_file!r}: not UTF-8 text ({exc.reason})") from None
    elif args.prompt == "-":
        prompt = sys.stdin.read()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise UsageError("no prompt: pass PROMPT, '-' to read standard input, or --prompt-file FILE")
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt


class _TimedStream:
    """A ``generate`` streamer: records when each new token arrives and, unless ``echo`` is off,
    prints the text as it grows (decoded from all new tokens so far, so that multi-byte
    characters split across tokens print whole)."""

    def __init__(self, tokenizer, echo: bool):
        self.tokenizer = tokenizer
        self.echo = echo
        self.prompt_seen = False
        self.ids: List[int] = []
        self.times: List[float] = []
        self.printed = ""

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        now = time.perf_counter()
        new = [int(t) for t in value.reshape(-1).tolist()]
        self.ids += new
        self.times += [now] * len(new)
        if self.echo:
            self._show(final=False)

    def end(self) -> None:
        if self.echo:
            self._show(final=True)
            sys.stdout.write("\n")
            sys.stdout.flush()

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for its next token
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
        else:  # a tokenizer that re-spells earlier text once more follows: print the new tail only
            common = os.path.commonprefix([text, self.printed])
            sys.stdout.write(text[len(common):])
        sys.stdout.flush()
        self.printed = text


def _input_ids(tok, prompt: str, chat: bool):
    import torch

    if chat:
        if not getattr(tok, "chat_template", None):
            raise CLIError("--chat: the tokenizer has no chat template (a base model?); leave --chat out to "
                           "continue the prompt as plain text")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long)
        return ids.reshape(1, -1)
    return tok(prompt, return_tensors="pt")["input_ids"]


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    _check_model_arg(args.model, "MODEL_OR_CHECKPOINT")
    tokenizer_path = _check_tokenizer_arg(args.tokenizer) if args.tokenizer else None
    device = _check_device(args.device)
    if args.temperature == 0.0 and (args.top_p != 1.0 or args.top_k != 0):
        raise UsageError("--top-p and --top-k shape sampling; they need --temperature > 0 (0 is greedy)")

    import torch

    t0 = time.perf_counter()
    _log(args, f"loading {args.model} ...")
    model, tok, desc = load_model(args.model, args.dtype, "MODEL_OR_CHECKPOINT", device=device, fuse=args.fuse)
    if tokenizer_path is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    if tok is None:
        raise CLIError(f"{args.model!r} has no tokenizer; pass --tokenizer PATH")
    t_load = time.perf_counter() - t0

    input_ids = _input_ids(tok, prompt, args.chat).to(device)
    from gptqkit.calibration import model_max_length

    limit = model_max_length(model.config)
    if limit is not None and input_ids.shape[1] + args.max_new_tokens > limit:
        raise UsageError(f"the prompt's {input_ids.shape[1]} tokens plus --max-new-tokens {args.max_new_tokens} "
                         f"exceed the model's {limit} positions")
    options: Dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0.0)
    if args.temperature > 0.0:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    else:  # the model's generation_config may ask for sampling: greedy means greedy
        options.update(temperature=None, top_p=None, top_k=None)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    torch.manual_seed(args.seed)
    _log(args, f"{desc}; prompt: {input_ids.shape[1]} tokens on {device}")

    stream = _TimedStream(tok, echo=not args.json)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pad_token_id=pad, streamer=stream, **options)
    end = time.perf_counter()
    new_ids = [int(t) for t in out[0, input_ids.shape[1]:].tolist()]
    n = len(new_ids)
    ttft = stream.times[0] - start if stream.times else None
    decode_s = stream.times[-1] - stream.times[0] if n > 1 else None
    decode_rate = (n - 1) / decode_s if decode_s else None
    result = {
        "model": args.model, "model_kind": desc, "device": device, "prompt": prompt,
        "chat": bool(args.chat), "prompt_tokens": int(input_ids.shape[1]),
        "text": tok.decode(new_ids, skip_special_tokens=True), "new_token_ids": new_ids, "new_tokens": n,
        "stopped_at_eos": n < args.max_new_tokens,
        "sampling": ({"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
                     if args.temperature > 0.0 else "greedy"),
        "time_to_first_token_seconds": None if ttft is None else round(ttft, 4),
        "decode_tokens_per_second": None if decode_rate is None else round(decode_rate, 2),
        "generate_seconds": round(end - start, 4), "load_seconds": round(t_load, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    rate = f", then {decode_rate:.1f} tokens/s" if decode_rate is not None else ""
    first = f"first token after {ttft * 1000:.0f} ms" if ttft is not None else "no token generated"
    stop = " (end of sequence)" if result["stopped_at_eos"] else ""
    print(f"[{result['prompt_tokens']} prompt tokens; {n} new tokens{stop}; {first}{rate}; "
          f"{end - start:.2f} s generating, {t_load:.1f} s loading]", file=sys.stderr)
    return 0
