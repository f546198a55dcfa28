"""Resumable quantization (gptqkit.resume): an interrupted run, run again with the
same resume folder, restores the finished blocks and ends with exactly the
checkpoint an uninterrupted run writes; a folder of another run is refused."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
torch = pytest.importorskip("torch")

from cli_runner import run_cli
from tiny_models import make_tiny_model, make_tiny_tokenizer

BLOCKS = 3
LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def _tokens(n=4, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 128, (n, seqlen), generator=g)


def _model(seed=0):
    return make_tiny_model("llama", seed=seed, num_hidden_layers=BLOCKS)


def _quantize(resume_dir=None, seed=0, calib_seed=0, **cfg):
    from gptqkit import GPTQForCausalLM, QuantizeConfig

    cfg.setdefault("group_size", 32)
    q = GPTQForCausalLM(_model(seed), QuantizeConfig(**cfg))
    q.quantize(_tokens(seed=calib_seed), batch_size=2, progress=False, resume_dir=resume_dir)
    return q


def _packed(q):
    from gptqkit.nn import QuantLinear

    return {n: (m.qweight.clone(), m.qzeros.clone(), m.scales.clone(), m.g_idx.clone())
            for n, m in q.model.named_modules() if isinstance(m, QuantLinear)}


def _assert_same(a, b):
    assert a.keys() == b.keys() and len(a) == BLOCKS * LAYERS_PER_BLOCK
    for name in a:
        for x, y, what in zip(a[name], b[name], ("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(x, y), f"{name}.{what} differs"


@pytest.fixture(scope="module")
def uninterrupted(gptqkit):
    q = _quantize()
    return _packed(q), q.report


class _Crash(Exception):
    pass


@contextlib.contextmanager
def _crash_at_layer(monkeypatch, n):
    """Makes the ``n``-th layer quantization (0-based) raise; counts the calls."""
    from gptqkit.model import GPTQForCausalLM

    real = GPTQForCausalLM._quantize_layer
    calls = []

    def wrapped(self, parent, name, full, *args, **kwargs):
        if len(calls) == n:
            raise _Crash(f"simulated crash at {full}")
        calls.append(full)
        return real(self, parent, name, full, *args, **kwargs)

    monkeypatch.setattr(GPTQForCausalLM, "_quantize_layer", wrapped)
    try:
        yield calls
    finally:
        monkeypatch.setattr(GPTQForCausalLM, "_quantize_layer", real)


def test_resume_after_crash_gives_the_uninterrupted_result(gptqkit, uninterrupted, tmp_path, monkeypatch):
    store = tmp_path / "partial"
    # Crash in the middle of block 2: blocks 0 and 1 are stored.
    with _crash_at_layer(monkeypatch, 2 * LAYERS_PER_BLOCK + 3), pytest.raises(_Crash):
        _quantize(resume_dir=store)
    assert sorted(p.name for p in store.iterdir()) == ["block-00000.safetensors", "block-00001.safetensors",
                                                       "manifest.json"]
    # A fresh model (as after a restart) resumes: only block 2 is quantized.
    with _crash_at_layer(monkeypatch, -1) as calls:
        q = _quantize(resume_dir=store)
    assert calls and all(".layers.2." in c for c in calls) and len(calls) == LAYERS_PER_BLOCK
    packed, report = uninterrupted
    _assert_same(_packed(q), packed)
    # The report covers every layer, the restored ones with their original figures.
    assert [r.name for r in q.report.layers] == [r.name for r in report.layers]
    assert [r.loss for r in q.report.layers] == pytest.approx([r.loss for r in report.layers], rel=1e-12)
    assert all(isinstance(r.shape, tuple) for r in q.report.layers)
    # The API leaves the folder (now complete) in place; no temporary files remain.
    assert sorted(p.name for p in store.iterdir()) == [f"block-0000{i}.safetensors" for i in range(BLOCKS)] + [
        "manifest.json"]


def test_complete_store_restores_every_block(gptqkit, uninterrupted, tmp_path, monkeypatch):
    store = tmp_path / "partial"
    _quantize(resume_dir=store)
    with _crash_at_layer(monkeypatch, 0):  # any quantization would raise
        q = _quantize(resume_dir=store)
    _assert_same(_packed(q), uninterrupted[0])
    ids = _tokens(2, 16, seed=9)
    ref = _quantize()
    with torch.no_grad():
        torch.testing.assert_close(q.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("change,needle", [
    (dict(bits=3), "quantize_config.bits: 4 there, 3 now"),
    (dict(calib_seed=1), "calibration differs"),
    (dict(seed=1), "model.weights differs"),
    (dict(checkpoint_format="gptq_v2"), "checkpoint_format"),
])
def test_store_of_another_run_is_refused(gptqkit, tmp_path, monkeypatch, change, needle):
    store = tmp_path / "partial"
    with _crash_at_layer(monkeypatch, LAYERS_PER_BLOCK + 1), pytest.raises(_Crash):
        _quantize(resume_dir=store)
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(ValueError, match="different run") as exc:
        _quantize(resume_dir=store, **change)
    assert needle in str(exc.value) and "--no-resume" in str(exc.value)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before  # nothing lost


def test_damaged_store_files_give_clear_errors(gptqkit, tmp_path, monkeypatch):
    store = tmp_path / "partial"
    with _crash_at_layer(monkeypatch, LAYERS_PER_BLOCK + 1), pytest.raises(_Crash):
        _quantize(resume_dir=store)
    block = store / "block-00000.safetensors"
    data = block.read_bytes()
    block.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"block-00000.safetensors is unreadable.*delete it"):
        _quantize(resume_dir=store)
    assert block.read_bytes() == data[: len(data) // 2]
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        _quantize(resume_dir=store)
    (store / "manifest.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="not a gptqkit store of version 1"):
        _quantize(resume_dir=store)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        _quantize(resume_dir=not_a_folder)


# --------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, gptqkit):
    import numpy as np

    root = tmp_path_factory.mktemp("resume-cli")
    model_dir = root / "tiny-llama"
    _model().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    np.save(root / "calib.npy", _tokens(4, 32).numpy())
    return root, str(model_dir), str(root / "calib.npy")


def test_cli_resumes_and_cleans_up(cli_files, monkeypatch):
    root, model, calib = cli_files
    out = root / "ckpt"
    args = ["quantize", model, out, "--group-size", "32", "--calibration", calib, "--batch-size", "2"]
    with _crash_at_layer(monkeypatch, LAYERS_PER_BLOCK + 2):
        status, _, err = run_cli(args)
    assert status == 1 and "simulated crash" in err
    partial = root / "ckpt.partial"
    assert (partial / "block-00000.safetensors").exists() and not out.exists()
    with _crash_at_layer(monkeypatch, -1) as calls:
        status, stdout, err = run_cli(args)
    assert status == 0, err
    assert "resuming" in err + stdout and len(calls) == 2 * LAYERS_PER_BLOCK
    assert not partial.exists() and (out / "quantize_config.json").exists()
    # The resumed checkpoint is the uninterrupted one.
    status, _, err = run_cli(args[:2] + [root / "ckpt-straight"] + args[3:])
    assert status == 0, err
    from safetensors.torch import load_file
    a, b = load_file(out / "model.safetensors"), load_file(root / "ckpt-straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_refuses_other_runs_folder_unless_no_resume(cli_files, monkeypatch):
    root, model, calib = cli_files
    out = root / "ckpt-b"
    args = ["quantize", model, out, "--group-size", "32", "--calibration", calib, "--batch-size", "2"]
    with _crash_at_layer(monkeypatch, LAYERS_PER_BLOCK + 2):
        assert run_cli(args)[0] == 1
    status, _, err = run_cli(args + ["--bits", "3"])
    assert status == 1 and "different run" in err and "--no-resume" in err
    with _crash_at_layer(monkeypatch, -1) as calls:
        status, stdout, err = run_cli(args + ["--bits", "3", "--no-resume"])
    assert status == 0, err
    assert len(calls) == BLOCKS * LAYERS_PER_BLOCK and not (root / "ckpt-b.partial").exists()


@pytest.mark.parametrize("where,needle", [("inside", "must not be OUT or inside it"),
                                          ("foreign", "did not write")])
def test_cli_checks_resume_dir_before_loading(cli_files, where, needle):
    root, model, calib = cli_files
    out = root / f"ckpt-{where}"
    if where == "inside":
        resume = out / "blocks"
    else:
        resume = root / "someones-folder"
        resume.mkdir(exist_ok=True)
        (resume / "notes.txt").write_text("keep me")
    status, _, err = run_cli(["quantize", model, out, "--calibration", calib, "--resume-dir", resume])
    assert status == 2 and needle in err
    if where == "foreign":
        assert (resume / "notes.txt").read_text() == "keep me"
