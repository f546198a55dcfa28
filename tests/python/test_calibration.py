"""Calibration data: every accepted form, sampling, padding, and the error cases."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
torch = pytest.importorskip("torch")

pytest.importorskip("transformers")

from gptqkit.calibration import (make_batches, model_max_length, prepare_calibration, read_jsonl,
                                 read_text_file, sample_windows)
from tiny_models import make_tiny_config, make_tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WIKI_VALID = os.path.join(HERE, "..", "..", "..", "shared", "data", "wikitext-2", "wiki.valid.tokens")

TEXT = ("The quick brown fox jumps over the lazy dog.\r\n"
        "\r\n"
        "Pack my box with five dozen liquor jugs.\n"
        "How vexingly quick daft zebras jump!\n") * 5


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _rows(batches):
    return [(r[m.bool()]).tolist() for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]


def test_list_of_strings_as_given(tok):
    batches = prepare_calibration(["hello", "hi there friend", "x"], tok, batch_size=2)
    assert len(batches) == 2
    b = batches[0]
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["attention_mask"].shape
    assert b["attention_mask"].tolist()[0] == [1] * 6 + [0] * 10          # right padding, marked
    assert b["input_ids"][0, 6:].tolist() == [tok.pad_token_id] * 10
    assert _rows(batches)[0] == tok("hello")["input_ids"]                 # BOS kept
    assert batches[1]["input_ids"].shape == (1, 2)


def test_list_of_strings_truncated_to_seqlen(tok):
    batches = prepare_calibration(["a long enough sentence"], tok, seqlen=5)
    assert batches[0]["input_ids"].shape == (1, 5)


def test_list_of_strings_sampled(tok):
    a = prepare_calibration([TEXT, TEXT], tok, nsamples=6, seqlen=16, seed=3, batch_size=4)
    b = prepare_calibration([TEXT, TEXT], tok, nsamples=6, seqlen=16, seed=3, batch_size=4)
    c = prepare_calibration([TEXT, TEXT], tok, nsamples=6, seqlen=16, seed=4, batch_size=4)
    assert [x["input_ids"].shape for x in a] == [(4, 16), (2, 16)]
    assert all(bool(x["attention_mask"].all()) for x in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_dicts(tok):
    enc = tok(["ab", "cdef"])                           # ragged lists of lists
    padded = tok(["ab", "cdef"], padding=True, return_tensors="pt")
    tok.padding_side = "left"
    left = tok(["ab", "cdef"], padding=True, return_tensors="pt")
    tok.padding_side = "right"
    for ex in ([enc], [padded], padded, [left],
               [{"input_ids": enc["input_ids"][0]}, {"input_ids": torch.tensor(enc["input_ids"][1])}]):
        batches = prepare_calibration(ex, tok, batch_size=2)
        assert len(batches) == 1
        assert batches[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
        assert _rows(batches) == enc["input_ids"]


def test_tensors_and_arrays():
    t = torch.randint(0, 100, (5, 7))
    for ex in (t, t.numpy(), t.tolist(), t.int()):
        batches = prepare_calibration(ex, batch_size=2)
        assert [b["input_ids"].shape for b in batches] == [(2, 7), (2, 7), (1, 7)]
        assert torch.equal(torch.cat([b["input_ids"] for b in batches]), t.long())
    one = prepare_calibration(torch.arange(9))
    assert one[0]["input_ids"].shape == (1, 9)
    with pytest.warns(UserWarning, match="fewer than nsamples"):
        assert len(prepare_calibration(t, nsamples=10)) == 5
    assert len(prepare_calibration(t, nsamples=2)) == 2


def test_text_file_sampling(tok, tmp_path):
    p = tmp_path / "calib.txt"
    p.write_bytes(TEXT.encode())
    assert "\r" not in read_text_file(p) and "\n\n" in read_text_file(p)
    batches = prepare_calibration(str(p), tok, nsamples=8, seqlen=20, seed=0, batch_size=8)
    assert batches[0]["input_ids"].shape == (8, 20)
    assert not (batches[0]["input_ids"] == tok.bos_token_id).any()      # stream without BOS
    again = prepare_calibration(p, tok, nsamples=8, seqlen=20, seed=0, batch_size=8)
    assert torch.equal(batches[0]["input_ids"], again[0]["input_ids"])


def test_jsonl_and_json(tok, tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXT.split("\n"))) + "\n\n")
    assert len(read_jsonl(p)) == len([t for t in TEXT.split("\n") if t.strip()])
    batches = prepare_calibration(str(p), tok, nsamples=3, seqlen=10)
    assert len(batches) == 3 and batches[0]["input_ids"].shape == (1, 10)
    q = tmp_path / "calib.json"
    q.write_text(json.dumps([{"text": TEXT}, "more text here"]))
    assert read_jsonl(q) == [TEXT, "more text here"]
    r = tmp_path / "other.jsonl"
    r.write_text(json.dumps({"content": TEXT}) + "\n")
    assert len(prepare_calibration(str(r), tok, nsamples=2, seqlen=8, text_field="content")) == 2


@pytest.mark.parametrize("ext", [".npy", ".pt", ".safetensors"])
def test_token_array_files(tmp_path, ext):
    ids = torch.randint(0, 100, (6, 11))
    p = tmp_path / f"ids{ext}"
    if ext == ".npy":
        np.save(p, ids.numpy().astype(np.int32))
    elif ext == ".pt":
        torch.save({"input_ids": ids}, p)
    else:
        from safetensors.torch import save_file
        save_file({"tokens": ids}, str(p))
    batches = prepare_calibration(str(p), batch_size=4)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids)   # used as is
    assert len(prepare_calibration(str(p), nsamples=4)) == 4


def test_real_wikitext_file(tok):
    if not os.path.isfile(WIKI_VALID):
        pytest.skip(f"shared data not found at {WIKI_VALID}")
    batches = prepare_calibration(WIKI_VALID, tok, nsamples=4, seqlen=32, seed=0, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32)]


def test_make_batches_and_sampling_helpers():
    b = make_batches([torch.tensor([1, 2, 3]), torch.tensor([4])], batch_size=2, pad_token_id=9)
    assert b[0]["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert b[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    w = sample_windows(torch.arange(100), nsamples=5, seqlen=10, seed=1)
    assert w.shape == (5, 10) and bool((w[:, 1:] - w[:, :-1] == 1).all())
    assert int(w.max()) <= 99
    with pytest.raises(ValueError, match="fewer than seqlen"):
        sample_windows(torch.arange(5), 1, 10)


def test_model_max_length():
    assert model_max_length(make_tiny_config("llama")) == 256
    assert model_max_length(make_tiny_config("gpt2")) == 256            # n_positions
    assert model_max_length(object()) is None


# ---------------------------------------------------------------- errors

def test_missing_files(tok, tmp_path):
    for name in ("nope.txt", "nope.jsonl", "nope.npy", "dir/nope"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            prepare_calibration(str(tmp_path / name), tok)
    with pytest.raises(FileNotFoundError):
        prepare_calibration(tmp_path / "nope.bin", tok)
    with pytest.raises(ValueError, match="folder"):
        prepare_calibration(str(tmp_path), tok)


def test_dataset_name_without_datasets_library(tok):
    import importlib.util
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    with pytest.raises(ValueError, match="datasets"):
        prepare_calibration("wikitext", tok)


def test_empty_data(tok, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration([], tok)
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration(["", "   "], tok)
    (tmp_path / "empty.txt").write_text("\n \n\r\n")
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration(str(tmp_path / "empty.txt"), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no text"):
        prepare_calibration(str(tmp_path / "empty.jsonl"), tok)
    np.save(tmp_path / "empty.npy", np.zeros((0, 8), dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration(str(tmp_path / "empty.npy"))
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration([{"input_ids": [1, 2], "attention_mask": [0, 0]}])


def test_malformed(tok, tmp_path):
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        prepare_calibration(["ok", 3], tok)
    with pytest.raises(ValueError, match=r"examples\[0\].*input_ids"):
        prepare_calibration([{"ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        prepare_calibration([{"input_ids": [1]}, "text"])
    with pytest.raises(ValueError, match="attention_mask"):
        prepare_calibration([{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}])
    with pytest.raises(ValueError, match="attention_mask"):
        prepare_calibration([{"input_ids": [1, 2], "attention_mask": [1, 2]}])
    with pytest.raises(ValueError, match="integers"):
        prepare_calibration(torch.rand(2, 4))
    with pytest.raises(ValueError, match="negative"):
        prepare_calibration(torch.tensor([[1, -2]]))
    with pytest.raises(ValueError, match="shape"):
        prepare_calibration(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        prepare_calibration(torch.tensor([[1, 200]]), vocab_size=128)
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_calibration(["text without a tokenizer"])
    with pytest.raises(ValueError, match="unsupported type"):
        prepare_calibration(3.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        prepare_calibration(str(bad), tok)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"nofield.jsonl:1.*'text'"):
        prepare_calibration(str(nofield), tok)
    np.save(tmp_path / "float.npy", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="integers"):
        prepare_calibration(str(tmp_path / "float.npy"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        prepare_calibration(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="nsamples"):
        prepare_calibration(["x"], tok, nsamples=0)


def test_seqlen_beyond_model_context(tok, tmp_path):
    maxlen = model_max_length(make_tiny_config("llama"))
    p = tmp_path / "c.txt"
    p.write_text(TEXT * 20)
    with pytest.raises(ValueError, match="beyond the model's maximum context"):
        prepare_calibration(str(p), tok, nsamples=2, seqlen=maxlen + 1, max_seqlen=maxlen)
    with pytest.raises(ValueError, match="beyond the model's maximum context"):
        prepare_calibration(torch.zeros(1, maxlen + 5, dtype=torch.long), max_seqlen=maxlen)
    ok = prepare_calibration(torch.zeros(1, maxlen + 5, dtype=torch.long), max_seqlen=maxlen, seqlen=maxlen)
    assert ok[0]["input_ids"].shape == (1, maxlen)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        prepare_calibration(["short"], tok, nsamples=1, seqlen=200)
