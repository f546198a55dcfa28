"""The ``gptqkit`` command line (``gptqkit.cli``): help texts, quantize -> info -> eval-ppl
on a tiny random Llama, and the error paths (one-line message, exit status 2 or 1).

Everything runs in-process through ``main(argv)`` except two ``python -m gptqkit``
calls that check the module entry point and the real exit status.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from cli_runner import run_cli
from tiny_models import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def cli(gptqkit):
    from gptqkit import cli as module
    return module


@pytest.fixture(scope="module")
def files(tmp_path_factory, cli):
    """A tiny Llama (hidden 64, 2 blocks, vocab 128) with its tokenizer, plus calibration and eval data."""
    import torch

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 100, size=(8, 64))
    np.save(root / "calib.npy", ids)
    torch.save(torch.as_tensor(ids[:6]), root / "calib.pt")
    words = ["".join(rng.choice(list(string.ascii_lowercase), size=5)) for _ in range(600)]
    (root / "text.txt").write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, 600, 12)) + "\n")
    no_tok = root / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tok / name)
    return {"root": root, "model": str(model_dir), "npy": str(root / "calib.npy"), "pt": str(root / "calib.pt"),
            "text": str(root / "text.txt"), "no_tok": str(no_tok)}


@pytest.fixture(scope="module")
def quantized(cli, files):
    """``(checkpoint folder, stdout, stderr)`` of one quantize run (4-bit g32, .npy calibration)."""
    out_dir = files["root"] / "tiny-gptq"
    status, out, err = run_cli(["quantize", files["model"], out_dir, "--bits", "4", "--group-size", "32",
                                 "--calibration", files["npy"], "-q"])
    assert status == 0, err
    return str(out_dir), out, err


def assert_one_line_error(err: str, *needles: str):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gptqkit: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# =========================================================================== help

@pytest.mark.parametrize("command, needles", [
    ([], ["quantize", "eval-ppl", "info", "--verbose", "Exit status"]),
    (["quantize"], ["--bits", "--group-size", "--desc-act", "--act-group-aware", "--static-groups", "--asym",
                    "--calibration",
                    "--nsamples", "--seqlen", "--seed", "--damp", "--block-size", "--no-true-sequential",
                    "--clip-steps", "--clip-min-ratio", "--gptaq", "--gptaq-alpha", "--format", "--batch-size",
                    "--device",
                    "--max-shard-size", "--dtype", "--eval", "--extra-cache", "--resume-dir", "--no-resume",
                    "act-order", "examples:", "OUT.partial", "Mixture-of-Experts",
                    "(default: 128)"]),
    (["eval-ppl"], ["--text", "--tokens", "--seqlen", "--windows", "--batch-size", "--compare", "KL",
                    "examples:", "(default: 512)"]),
    (["info"], ["--json", "CHECKPOINT", "examples:", "float16"]),
    (["generate"], ["PROMPT", "--prompt-file", "--chat", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
                    "--seed", "--device", "--no-fuse", "--json", "greedy", "examples:", "(default: 64)"]),
])
def test_help_teaches(cli, capsys, command, needles):
    assert cli.main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    for n in needles:
        assert n in out, f"{n!r} missing from `gptqkit {' '.join(command)} --help`"


def test_version_and_no_command(cli, capsys, gptqkit):
    assert cli.main(["--version"]) == 0
    assert gptqkit.__version__ in capsys.readouterr().out
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "choose a command" in err and "generate" in err


# =========================================================================== quantize -> info -> eval-ppl

def test_quantize_prints_summary_and_writes_checkpoint(quantized):
    out_dir, out, _ = quantized
    assert "quantized 14 layers" in out                    # report.summary()
    assert "GPTQ loss" in out
    assert f"saved GPTQ checkpoint to {os.path.realpath(out_dir)}" in out
    assert "size on disk:" in out
    with open(os.path.join(out_dir, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, 32, True,
                                                                                            False)
    for name in ("quantize_config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out_dir, name)), name


def test_quantize_options_pt_calibration_and_eval(cli, files, capsys):
    out_dir = files["root"] / "tiny-gptq-ao"
    status = cli.main(["quantize", files["model"], str(out_dir), "--bits", "3", "--group-size", "16",
                       "--desc-act", "--asym", "--format", "gptq_v2", "--damp", "0.05", "--clip-steps", "4",
                       "--no-true-sequential", "--calibration", files["pt"], "--nsamples", "4", "--seqlen", "48",
                       "--eval", "--eval-text", files["text"], "--eval-windows", "2", "-q"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "quantized 14 layers" in out and "on 192 calibration tokens" in out   # 4 rows x 48 tokens
    ppl_line = next(ln for ln in out.splitlines() if ln.startswith("perplexity:"))
    assert "2 windows of 256 tokens" in ppl_line                                  # capped at the model's context
    assert math.isfinite(float(ppl_line.split()[1]))
    qc = json.loads((out_dir / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == \
        (3, 16, True, False, "gptq_v2")
    assert (qc["damp_percent"], qc["true_sequential"], qc["meta"]["clip_steps"]) == (0.05, False, 4)

    assert cli.main(["info", str(out_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint_format"] == "gptq_v2"
    assert any(layer["act_order"] for layer in info["layers"].values())


def test_quantize_moe_model_then_info_and_eval(cli, files, capsys):
    """A tiny Mixtral through the CLI: every expert quantized per expert, info lists the expert
    layers, eval-ppl runs the checkpoint."""
    model_dir = files["root"] / "tiny-mixtral"
    make_tiny_model("mixtral").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out_dir = files["root"] / "tiny-mixtral-gptq"
    assert cli.main(["quantize", str(model_dir), str(out_dir), "--group-size", "32",
                     "--calibration", files["npy"], "--nsamples", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "quantized 32 layers" in out  # 2 blocks x (4 attention + 4 experts x 3)
    assert cli.main(["info", str(out_dir), "--per-expert"]) == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model.layers.")]
    assert len(table) == 32 and "model.layers.1.mlp.experts.3.down_proj" in {ln.split()[0] for ln in table}
    per_expert_bytes = {ln.split()[0]: ln.split()[-2:] for ln in table}
    assert cli.main(["info", str(out_dir)]) == 0  # by default a block's experts share a row per projection
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model.layers.")]
    assert len(table) == 2 * (4 + 3)
    row = next(ln for ln in table if ln.startswith("model.layers.1.mlp.experts.{0-3}.down_proj (x4) "))
    assert row.split()[2:5] == ["64", "x", "128"]  # out x in of one expert's down_proj
    assert per_expert_bytes["model.layers.1.mlp.experts.0.down_proj"] == \
        per_expert_bytes["model.layers.1.mlp.experts.3.down_proj"]
    assert cli.main(["eval-ppl", str(out_dir), "--tokens", files["npy"], "--seqlen", "32", "--windows", "4"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_info_rows_group_experts_with_equal_settings(cli):
    def layer(bits=4, out=64, nbytes=100):
        return {"out_features": out, "in_features": 32, "bits": bits, "group_size": 32, "groups": 1,
                "act_order": False, "bytes": nbytes}
    layers = {f"m.layers.0.mlp.experts.{e}.down_proj": layer() for e in (0, 1, 2, 3, 5, 7, 8, 9, 10)}
    layers["m.layers.0.mlp.experts.4.down_proj"] = layer(bits=8)       # a dynamic override: its own row
    layers["m.layers.0.mlp.experts.6.down_proj"] = layer(nbytes=300)   # bytes may differ within a row
    layers["m.layers.0.self_attn.q_proj"] = layer()
    layers["m.layers.10.mlp.experts.0.down_proj"] = layer()            # another block: another row
    rows = cli.info._layer_rows(layers, per_expert=False)
    assert [(label, row["bits"], row["bytes"]) for label, row in rows] == [
        ("m.layers.0.mlp.experts.{0-3,5-10}.down_proj (x10)", 4, 10 * 100 + 200),
        ("m.layers.0.mlp.experts.4.down_proj", 8, 100),
        ("m.layers.0.self_attn.q_proj", 4, 100),
        ("m.layers.10.mlp.experts.0.down_proj", 4, 100)]
    assert [label for label, _ in cli.info._layer_rows(layers, per_expert=True)][:3] == [
        f"m.layers.0.mlp.experts.{e}.down_proj" for e in range(3)]


def test_info_text(cli, quantized, capsys):
    out_dir = quantized[0]
    assert cli.main(["info", out_dir]) == 0
    out = capsys.readouterr().out
    assert os.path.abspath(out_dir) in out
    assert "bits 4, group size 32, sym" in out
    table = [ln for ln in out.splitlines() if ln.startswith("model.layers.")]
    assert len(table) == 14
    assert table[0].split()[:2] == ["model.layers.0.mlp.down_proj", "64"]          # name, out x in
    assert "bits per weight" in out and "in float16" in out


def test_info_json(cli, quantized, capsys):
    out_dir = quantized[0]
    assert cli.main(["info", out_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["bits"], info["group_size"], info["num_quantized_layers"]) == (4, 32, 14)
    q = info["layers"]["model.layers.1.self_attn.q_proj"]
    assert (q["in_features"], q["out_features"], q["groups"], q["act_order"]) == (64, 64, 2, False)
    assert info["quantized_bytes"] < info["fp16_bytes"]
    assert info["disk_bytes"] > info["total_bytes"] > 0


def test_eval_ppl_on_text(cli, quantized, files, capsys):
    assert cli.main(["eval-ppl", quantized[0], "--text", files["text"], "--seqlen", "64", "--windows", "3",
                     "-q"]) == 0
    out = capsys.readouterr().out
    assert "GPTQ checkpoint, 4-bit, group size 32" in out
    ppl = float(next(ln for ln in out.splitlines() if ln.startswith("perplexity:")).split()[1])
    assert 1.0 < ppl < 1000.0
    assert "189 predicted (3 windows of 64)" in out                                   # 3 x 63 positions
    assert "seconds:" in out


def test_eval_ppl_tokens_compare_json(cli, quantized, files, capsys):
    argv = ["--tokens", files["npy"], "--seqlen", "32", "--windows", "4", "--json", "-q"]
    assert cli.main(["eval-ppl", quantized[0], "--compare", files["model"]] + argv) == 0
    q = json.loads(capsys.readouterr().out)
    assert (q["tokens"], q["windows"]) == (4 * 31, 4)
    assert 0.0 <= q["kl_divergence"] <= q["kl_divergence_max_window"] < 1.0
    assert cli.main(["eval-ppl", files["model"]] + argv) == 0                         # fp32 model alone
    fp = json.loads(capsys.readouterr().out)
    assert fp["model_kind"].startswith("full-precision")
    assert fp["perplexity"] == pytest.approx(q["compare_perplexity"], rel=1e-5)
    assert cli.main(["eval-ppl", quantized[0]] + argv) == 0                           # quantized alone
    alone = json.loads(capsys.readouterr().out)
    assert alone["perplexity"] == pytest.approx(q["perplexity"], rel=1e-5)


# =========================================================================== generate

def _generate_json(cli, capsys, argv):
    assert cli.main(["generate"] + [str(a) for a in argv] + ["--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_greedy_equals_model_generate(cli, quantized, capsys):
    """The command's tokens are what the library's own ``generate`` gives (greedy, same prompt), with
    the q/k/v and gate/up layers fused (the default) and without (``--no-fuse``)."""
    import torch
    from gptqkit import GPTQForCausalLM

    got = _generate_json(cli, capsys, [quantized[0], "hello world", "--max-new-tokens", "12"])
    q = GPTQForCausalLM.from_quantized(quantized[0])
    ids = q.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = q.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=q.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert got["new_token_ids"] == want and got["new_tokens"] == len(want) > 0
    assert got["prompt_tokens"] == ids.shape[1]
    assert got["text"] == q.tokenizer.decode(want, skip_special_tokens=True)
    assert got["stopped_at_eos"] == (len(want) < 12)
    assert got["sampling"] == "greedy" and got["model_kind"].startswith("GPTQ checkpoint, 4-bit")
    assert got["generate_seconds"] > 0 and got["time_to_first_token_seconds"] > 0
    if len(want) > 1:
        assert got["decode_tokens_per_second"] > 0
    assert "fused into" in got["model_kind"]
    unfused = _generate_json(cli, capsys, [quantized[0], "hello world", "--max-new-tokens", "12", "--no-fuse"])
    assert unfused["new_token_ids"] == want and "fused" not in unfused["model_kind"]


def test_generate_streams_text_to_stdout_and_figures_to_stderr(cli, quantized, capsys):
    want = _generate_json(cli, capsys, [quantized[0], "abc", "--max-new-tokens", "10"])
    assert cli.main(["generate", quantized[0], "abc", "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    assert out == want["text"] + "\n"
    assert f"[{want['prompt_tokens']} prompt tokens; {want['new_tokens']} new tokens" in err
    assert "loading" in err                                                            # chatter without -q


def test_generate_full_precision_model_and_stdin_prompt(cli, files, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello world"))
    from_stdin = _generate_json(cli, capsys, [files["model"], "-", "--max-new-tokens", "6"])
    assert from_stdin["model_kind"].startswith("full-precision") and from_stdin["prompt"] == "hello world"
    prompt_file = files["root"] / "prompt.txt"
    prompt_file.write_text("hello world", encoding="utf-8")
    from_file = _generate_json(cli, capsys, [files["model"], "--prompt-file", prompt_file, "--max-new-tokens", "6"])
    assert from_file["new_token_ids"] == from_stdin["new_token_ids"]


def test_generate_sampling_is_seeded(cli, quantized, capsys):
    argv = [quantized[0], "the", "--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "50"]
    runs = [_generate_json(cli, capsys, argv + ["--seed", str(seed)]) for seed in (7, 7, 8)]
    assert runs[0]["new_token_ids"] == runs[1]["new_token_ids"]
    assert runs[0]["sampling"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 50, "seed": 7}
    greedy = _generate_json(cli, capsys, argv[:4])
    assert greedy["new_token_ids"] not in [r["new_token_ids"] for r in runs]   # a near-uniform model, T 1.5


def test_generate_chat_template(cli, quantized, files, capsys, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(quantized[0])
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    tok.save_pretrained(tmp_path)
    got = _generate_json(cli, capsys, [quantized[0], "hi", "--chat", "--tokenizer", tmp_path,
                                       "--max-new-tokens", "4"])
    assert got["chat"] is True
    assert got["prompt_tokens"] == len(tok("<user>hi\n<assistant>", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("argv, status, needles", [
    (["--max-new-tokens", "4"], 2, ["no prompt"]),
    (["   ", "--max-new-tokens", "4"], 2, ["prompt is empty"]),
    (["x", "--prompt-file", "p.txt"], 2, ["not both"]),
    (["--prompt-file", "missing.txt"], 2, ["--prompt-file", "no such file"]),
    (["x", "--top-p", "0.5"], 2, ["--temperature > 0"]),
    (["x", "--temperature", "-1"], 2, ["--temperature"]),
    (["x", "--temperature", "nan"], 2, ["--temperature"]),
    (["x", "--top-p", "1.5", "--temperature", "1"], 2, ["--top-p"]),
    (["x", "--max-new-tokens", "0"], 2, ["--max-new-tokens"]),
    (["x", "--max-new-tokens", "1000"], 2, ["exceed the model's 256 positions"]),
    (["x", "--chat"], 1, ["no chat template"]),
    (["x", "--device", "tpu"], 2, ["--device"]),
    (["x", "y"], 2, ["unrecognized arguments: x y"]),
])
def test_generate_errors(cli, quantized, files, capsys, monkeypatch, argv, status, needles):
    monkeypatch.chdir(files["root"])
    (files["root"] / "p.txt").write_text("x")
    assert cli.main(["generate", quantized[0], "-q"] + argv) == status
    assert_one_line_error(capsys.readouterr().err, *needles)


# =========================================================================== errors

def test_missing_model_folder(cli, files, capsys):
    missing = str(files["root"] / "no-such-model")
    assert cli.main(["quantize", missing, str(files["root"] / "o1"), "--calibration", files["npy"]]) == 2
    assert_one_line_error(capsys.readouterr().err, "no such model folder")
    assert cli.main(["eval-ppl", missing, "--tokens", files["npy"]]) == 2
    assert_one_line_error(capsys.readouterr().err, "no such model folder")


@pytest.mark.parametrize("value", ["-1", "many", "inf"])
def test_bad_extra_cache(cli, files, capsys, value):
    assert cli.main(["quantize", files["model"], str(files["root"] / "o3"), "--extra-cache", value]) == 2
    assert_one_line_error(capsys.readouterr().err, "--extra-cache", "number >= 0")


@pytest.mark.parametrize("value", ["lots", "0", "-1GB"])
def test_bad_hessian_memory(cli, files, capsys, value):
    assert cli.main(["quantize", files["model"], str(files["root"] / "o4"), "--hessian-memory", value]) == 2
    assert "--hessian-memory" in capsys.readouterr().err


def test_hessian_memory_reaches_quantize(cli, files, capsys):
    """A tiny Mixtral under a 40 KB cap: its experts' Hessians are collected in extra passes."""
    model_dir = files["root"] / "tiny-mixtral-capped"
    make_tiny_model("mixtral").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    assert cli.main(["quantize", str(model_dir), str(files["root"] / "capped-gptq"), "--group-size", "32",
                     "--calibration", files["npy"], "--nsamples", "2", "--hessian-memory", "40KB", "-q"]) == 0
    assert "extra pass(es)" in capsys.readouterr().out


def test_bad_bits(cli, files, capsys):
    assert cli.main(["quantize", files["model"], str(files["root"] / "o2"), "--bits", "5"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--bits", "2, 3, 4 or 8")


def test_act_group_aware_conflicts_with_desc_act(cli, files, capsys):
    out = str(files["root"] / "o4")
    assert cli.main(["quantize", files["model"], out, "--act-group-aware", "--desc-act",
                     "--calibration", files["npy"]]) == 2
    assert_one_line_error(capsys.readouterr().err, "act_group_aware", "desc_act")
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags,on", [([], True), (["--act-group-aware"], True), (["--no-act-group-aware"], False)])
def test_act_group_aware_quantize_and_info(cli, files, capsys, flags, on):
    out_dir = files["root"] / f"tiny-gptq-gar-{len(flags)}-{on}"
    status, out, err = run_cli(["quantize", files["model"], out_dir, "--group-size", "32", *flags,
                                 "--calibration", files["npy"], "-q"])
    assert status == 0, err
    assert ("group-aware order" in out) is on
    qc = json.loads((out_dir / "quantize_config.json").read_text())
    assert qc["desc_act"] is False and qc["meta"]["act_group_aware"] is on
    assert cli.main(["info", str(out_dir)]) == 0
    assert f"group-aware order {'on' if on else 'off'}" in capsys.readouterr().out


def test_gptaq_quantize_and_info(cli, files, capsys):
    out_dir = files["root"] / "tiny-gptq-gptaq"
    status, out, err = run_cli(["quantize", files["model"], out_dir, "--group-size", "32", "--gptaq",
                                "--gptaq-alpha", "0.25", "--calibration", files["npy"], "-q"])
    assert status == 0, err
    assert "asymmetric calibration (alpha 0.25)" in out
    qc = json.loads((out_dir / "quantize_config.json").read_text())
    assert qc["meta"]["gptaq"] == {"alpha": 0.25}
    assert cli.main(["info", str(out_dir)]) == 0
    assert "asymmetric calibration (gptaq) alpha 0.25" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "1.5", "x"])
def test_bad_gptaq_alpha(cli, files, capsys, value):
    assert cli.main(["quantize", files["model"], str(files["root"] / "o5"), "--gptaq-alpha", value]) == 2
    assert "--gptaq-alpha" in capsys.readouterr().err


def test_missing_calibration_file(cli, files, capsys):
    out = str(files["root"] / "o3")
    assert cli.main(["quantize", files["model"], out, "--calibration", str(files["root"] / "nope.npy")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--calibration", "no such file")
    assert not os.path.exists(out)


def test_no_default_calibration(cli, files, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli._common, "data_search_paths", lambda name: [tmp_path / "wikitext-2" / name])
    assert cli.main(["quantize", files["model"], str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--calibration")


def test_data_env_variable(cli, monkeypatch, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text("hello\n")
    monkeypatch.setenv("GPTQKIT_DATA", str(tmp_path))
    assert cli.find_data_file("wiki.valid.tokens") == str(tmp_path / "wikitext-2" / "wiki.valid.tokens")


def test_refuses_non_checkpoint_output_folder(cli, files, capsys):
    # the output folder holds something else (here: the fp model itself) -> refused before any work
    assert cli.main(["quantize", files["model"], files["no_tok"], "--calibration", files["npy"]]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a GPTQ checkpoint")


def test_text_calibration_needs_tokenizer(cli, files, capsys):
    assert cli.main(["quantize", files["no_tok"], str(files["root"] / "o4"), "--calibration", files["text"],
                     "-q"]) == 1
    assert_one_line_error(capsys.readouterr().err, "no tokenizer", "--tokenizer")


def test_info_on_non_checkpoint(cli, files, capsys):
    assert cli.main(["info", files["model"]]) == 2
    assert_one_line_error(capsys.readouterr().err, "not a GPTQ checkpoint")
    assert cli.main(["info", str(files["root"] / "missing")]) == 2
    assert_one_line_error(capsys.readouterr().err, "no such folder")


def test_corrupt_checkpoint(cli, quantized, files, capsys):
    bad = files["root"] / "corrupt"
    shutil.copytree(quantized[0], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert cli.main(["info", str(bad)]) == 1
    assert_one_line_error(capsys.readouterr().err, "model.safetensors")
    assert cli.main(["eval-ppl", str(bad), "--tokens", files["npy"], "--seqlen", "32", "-q"]) == 1
    assert_one_line_error(capsys.readouterr().err, "model.safetensors")
    assert cli.main(["info", str(bad), "--verbose"]) == 1                              # --verbose: traceback
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("gptqkit: error: ")


def test_python_m_gptqkit(files, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gptqkit", "info", "--help"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "--json" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gptqkit", "info", str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "no such folder")
