"""Perplexity and KL divergence helpers on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
torch = pytest.importorskip("torch")

pytest.importorskip("transformers")

from gptqkit.evaluation import eval_windows, kl_divergence, load_eval_tokens, perplexity
from tiny_models import make_tiny_model, make_tiny_tokenizer

TEXT = "\r\n".join(f" = Section {i} = \r\n The value of item {i} is {i * 7 % 13} ." for i in range(40)) + "\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "test.raw"
    p.write_bytes(TEXT.encode())
    return make_tiny_model("llama"), make_tiny_tokenizer(), str(p)


def test_tokens_prepared_wikitext_way(setup):
    _, tok, path = setup
    ids = load_eval_tokens(path, tok)
    text = "\n\n".join(TEXT.replace("\r\n", "\n").split("\n")[:-1])
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in ids.tolist()


def test_perplexity_matches_manual(setup):
    model, tok, path = setup
    r = perplexity(model, tok, path, seqlen=32, windows=3, progress=False)
    ids = load_eval_tokens(path, tok)[: 3 * 32].reshape(3, 32)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:]) for w in ids]
    # GPTQ's formula: exp(sum(loss_i * seqlen) / (W * seqlen))
    expect = math.exp(sum(float(l) * 32 for l in losses) / (3 * 32))
    assert r.ppl == pytest.approx(expect, rel=1e-5)
    assert (r.windows, r.tokens, r.seqlen) == (3, 3 * 31, 32)
    # batching and a plain callable give the same figure
    r2 = perplexity(lambda x: model(x).logits, tok, path, seqlen=32, windows=3, batch_size=2, progress=False)
    assert r2.ppl == pytest.approx(r.ppl, rel=1e-5)
    r3 = perplexity(model, tokens=load_eval_tokens(path, tok), seqlen=32, windows=3, progress=False)
    assert r3.ppl == pytest.approx(r.ppl, rel=1e-6)


def test_kl(setup):
    model, tok, path = setup
    same = kl_divergence(model, model, tok, path, seqlen=32, windows=2, progress=False)
    assert abs(same.kl) < 1e-6 and same.ppl_ref == pytest.approx(same.ppl_q)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    k = kl_divergence(model, other, tok, path, seqlen=32, windows=2, batch_size=2, progress=False)
    assert k.kl > 1e-4 and k.kl_max >= k.kl
    assert k.ppl_ref == pytest.approx(perplexity(model, tok, path, seqlen=32, windows=2, progress=False).ppl,
                                      rel=1e-5)
    assert k.ppl_q == pytest.approx(perplexity(other, tok, path, seqlen=32, windows=2, progress=False).ppl,
                                    rel=1e-5)
    assert (k.windows, k.tokens) == (2, 62)


def test_training_flag_restored(setup):
    model, tok, path = setup
    model.train()
    perplexity(model, tok, path, seqlen=16, windows=1, progress=False)
    assert model.training
    model.eval()


def test_errors(setup, tmp_path):
    model, tok, path = setup
    with pytest.raises(FileNotFoundError):
        perplexity(model, tok, str(tmp_path / "missing.raw"))
    with pytest.raises(ValueError, match="only"):
        perplexity(model, tok, path, seqlen=32, windows=10_000, progress=False)
    with pytest.raises(ValueError, match="seqlen"):
        eval_windows(torch.arange(10), 1)
    with pytest.raises(ValueError, match="less than one window"):
        eval_windows(torch.arange(10), 20)
    assert eval_windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    (tmp_path / "empty.raw").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_eval_tokens(str(tmp_path / "empty.raw"), tok)
