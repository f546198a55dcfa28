"""SmolLM2-135M end to end, the real-model check of the GPTQ issue (slow: minutes on 2 cores).

Quantizes the real model with gptqkit's recommended settings (4-bit, group
128, act-order, clipping search) on 128 windows of 512 tokens of
WikiText-2's validation split, then scores it on the first 40 windows of 512
tokens of the test split against the fp32 model. Goals from the issue:
perplexity below 43.0 and mean KL below 0.40 (round-to-nearest gives 43.1 /
0.53; the best existing tool ~43.0 / ~0.40), and a saved checkpoint that
reloads to the same perplexity.

Needs the model (``scripts/fetch_smollm2.py``) and ``../shared/data``;
skipped with the reason otherwise. Timing is reported by
``benchmarks/bench_smollm2.py``, never asserted here.
"""

from __future__ import annotations

import os

import pytest
torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
MODEL = os.path.join(os.environ.get("GPTQKIT_CACHE", os.path.expanduser("~/.cache/gptqkit")), "models",
                     "SmolLM2-135M")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paths():
    if not os.path.isfile(os.path.join(MODEL, ".complete")):
        pytest.skip(f"SmolLM2-135M not found at {MODEL} (run scripts/fetch_smollm2.py)")
    for name in ("wiki.valid.tokens", "wiki.test.raw"):
        if not os.path.isfile(os.path.join(DATA, name)):
            pytest.skip(f"{name} not found in {DATA}")
    return MODEL, DATA


def test_smollm2_4bit_beats_the_goals_and_reloads_identically(gptqkit, paths, tmp_path):
    from transformers import AutoModelForCausalLM

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.evaluation import kl_divergence, perplexity

    model_dir, data = paths
    test_text = os.path.join(data, "wiki.test.raw")
    cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=True, clip_steps=16)
    q = GPTQForCausalLM.from_pretrained(model_dir, cfg, dtype=torch.float32)
    report = q.quantize(os.path.join(data, "wiki.valid.tokens"), nsamples=128, seqlen=512, seed=0, progress=False)
    assert len(report.layers) == 30 * 7 and report.tokens == 128 * 512
    in_memory = perplexity(q.model, q.tokenizer, test_text, seqlen=512, windows=40, progress=False).ppl
    out = q.save_quantized(str(tmp_path / "smollm2-gptq"))
    del q

    loaded = GPTQForCausalLM.from_quantized(out)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    k = kl_divergence(ref, loaded.model, loaded.tokenizer, test_text, seqlen=512, windows=40, progress=False)
    print(f"fp32 {k.ppl_ref:.3f}, gptqkit 4-bit g128 {k.ppl_q:.3f}, KL {k.kl:.4f}, "
          f"quantize {report.seconds:.0f} s, peak RSS {report.peak_rss_mb:.0f} MB")
    assert abs(k.ppl_ref - 29.01) < 0.05  # the evaluation itself matches the reference setup
    assert k.ppl_q == pytest.approx(in_memory, rel=1e-5)  # save -> load changes nothing
    assert k.ppl_q < 43.0
    assert k.kl < 0.40

    # Act-order: q/k/v (and gate/up) saw one Hessian, so they share g_idx and fuse.
    fused = GPTQForCausalLM.from_quantized(out, fuse=True)
    from gptqkit.nn import fused_groups

    assert len(fused_groups(fused.model)) == 30 * 2
    ids = loaded.tokenizer("The history of the city begins in the early medieval period", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fused(**ids).logits, loaded(**ids).logits, rtol=0, atol=0)


def test_smollm2_asymmetric_calibration_beats_plain_gptq(gptqkit, paths):
    """gptaq on 32 windows: KL below 0.17, where plain GPTQ with the same settings gives about 0.21
    (0.204 on 128 windows in the test above; 0.206 measured on 32). Measured with gptaq: 0.133."""
    from transformers import AutoModelForCausalLM

    from gptqkit import GPTQForCausalLM, QuantizeConfig
    from gptqkit.evaluation import kl_divergence

    model_dir, data = paths
    cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=True, clip_steps=16, gptaq=True)
    q = GPTQForCausalLM.from_pretrained(model_dir, cfg, dtype=torch.float32)
    report = q.quantize(os.path.join(data, "wiki.valid.tokens"), nsamples=32, seqlen=512, seed=0, progress=False)
    shifts = [r.target_shift for r in report.layers]
    assert all(s is not None for s in shifts) and max(shifts) > 0.01
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    k = kl_divergence(ref, q.model, q.tokenizer, os.path.join(data, "wiki.test.raw"), seqlen=512, windows=40,
                      progress=False)
    print(f"gptaq (alpha {cfg.gptaq_alpha}), 32 windows: ppl {k.ppl_q:.3f}, KL {k.kl:.4f}, "
          f"quantize {report.seconds:.0f} s, peak RSS {report.peak_rss_mb:.0f} MB")
    assert k.kl < 0.17
