"""QuantizeConfig: validation, serialisation, reading other tools' configs, dynamic overrides."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from gptqkit.config import LayerSettings, QuantizeConfig


def test_defaults():
    c = QuantizeConfig()
    assert (c.bits, c.group_size, c.damp_percent, c.desc_act, c.static_groups, c.sym) == (4, 128, 0.01, False, False, True)
    assert c.true_sequential and c.cache_block_outputs and not c.lm_head
    assert c.block_size == 128 and c.checkpoint_format == "gptq"
    assert c.dynamic is None and c.modules_in_block_to_quantize is None and c.model_seqlen is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=5), "bits"),
    (dict(bits=True), "bits"),
    (dict(bits="4"), "bits"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=-2), "group_size"),
    (dict(group_size=12.0), "group_size"),
    (dict(damp_percent=0), "damp_percent"),
    (dict(damp_percent=-0.1), "damp_percent"),
    (dict(damp_percent=1.5), "damp_percent"),
    (dict(desc_act=1), "desc_act"),
    (dict(sym="yes"), "sym"),
    (dict(static_groups=None), "static_groups"),
    (dict(act_group_aware=1), "act_group_aware"),
    (dict(act_group_aware=True, desc_act=True), "act_group_aware"),
    (dict(act_group_aware=True, group_size=-1), "act_group_aware"),
    (dict(true_sequential=0), "true_sequential"),
    (dict(lm_head="false"), "lm_head"),
    (dict(cache_block_outputs=None), "cache_block_outputs"),
    (dict(block_size=0), "block_size"),
    (dict(model_seqlen=-1), "model_seqlen"),
    (dict(checkpoint_format="marlin"), "checkpoint_format"),
    (dict(modules_in_block_to_quantize=["self_attn.q_proj"]), "modules_in_block_to_quantize"),
    (dict(modules_in_block_to_quantize=[[]]), "modules_in_block_to_quantize"),
    (dict(modules_in_block_to_quantize=[]), "modules_in_block_to_quantize"),
    (dict(modules_in_block_to_quantize=[["a"], ["a"]]), "modules_in_block_to_quantize"),
    (dict(dynamic=[".*"]), "dynamic"),
    (dict(dynamic={"(": {"bits": 8}}), "dynamic"),
    (dict(dynamic={".*": {"bits": 5}}), "dynamic"),
    (dict(dynamic={".*": {"group_size": 0}}), "dynamic"),
    (dict(dynamic={".*": {"wbits": 8}}), "dynamic"),
    (dict(dynamic={".*": 8}), "dynamic"),
    (dict(dynamic={"-:.*": {"bits": 8}}), "dynamic"),
    (dict(dynamic={".*": {"skip": True, "bits": 8}}), "dynamic"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizeConfig(**kwargs)


def test_valid_edge_values():
    QuantizeConfig(bits=2, group_size=-1, damp_percent=1.0)
    QuantizeConfig(bits=3, group_size=32, damp_percent=1e-4, model_seqlen=2048)
    QuantizeConfig(bits=8, checkpoint_format="gptq_v2", desc_act=True, static_groups=True, sym=False)
    c = QuantizeConfig(modules_in_block_to_quantize=(("q", "k"), ("o",)))
    assert c.modules_in_block_to_quantize == [["q", "k"], ["o"]]
    assert QuantizeConfig(dynamic={}).dynamic is None


def test_validate_after_mutation():
    c = QuantizeConfig()
    c.bits = 7
    with pytest.raises(ValueError, match="bits"):
        c.validate()


def _full_config():
    return QuantizeConfig(bits=3, group_size=64, damp_percent=0.05, desc_act=True, static_groups=True, sym=False,
                          true_sequential=False, block_size=64,
                          modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj"], ["mlp.down_proj"]],
                          lm_head=True, dynamic={r".*\.down_proj": {"bits": 8}, r"-:.*\.0\..*": {}},
                          model_seqlen=1024, cache_block_outputs=False, checkpoint_format="gptq_v2")


def test_to_dict_round_trip():
    c = _full_config()
    d = c.to_dict()
    json.dumps(d)
    assert QuantizeConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown QuantizeConfig field"):
        QuantizeConfig.from_dict({**d, "wbits": 4})


def test_quantization_config_dict():
    import gptqkit
    c = QuantizeConfig(bits=4, group_size=128, desc_act=True)
    q = c.to_quantization_config()
    for key in ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "damp_percent"):
        assert q[key] == getattr(c, key)
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    assert q["meta"]["quantizer"] == f"gptqkit:{gptqkit.__version__}"
    assert "dynamic" not in q and "modules_in_block_to_quantize" not in q
    json.dumps(q)
    assert QuantizeConfig.from_quantization_config(q) == c
    full = _full_config()
    assert QuantizeConfig.from_quantization_config(full.to_quantization_config()) == full


def test_save_load(tmp_path):
    c = _full_config()
    path = c.save(tmp_path)
    assert os.path.basename(path) == "quantize_config.json"
    assert [p.name for p in tmp_path.iterdir()] == ["quantize_config.json"]  # no temp file left
    assert QuantizeConfig.load(tmp_path) == c
    assert QuantizeConfig.load(path) == c


def test_load_from_config_json(tmp_path):
    c = QuantizeConfig(bits=8, group_size=32, act_group_aware=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": c.to_quantization_config()}))
    assert QuantizeConfig.load(tmp_path) == c
    assert QuantizeConfig.load(tmp_path / "config.json") == c


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        QuantizeConfig.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="quantize_config.json"):
        QuantizeConfig.load(tmp_path)
    (tmp_path / "quantize_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        QuantizeConfig.load(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 5}))
    with pytest.raises(ValueError, match="bits"):
        QuantizeConfig.load(tmp_path)


def test_reads_autogptq_config():
    d = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
         "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
         "is_marlin_format": False, "quant_method": "gptq"}
    c = QuantizeConfig.from_quantization_config(d)
    assert c.bits == 4 and c.desc_act and c.checkpoint_format == "gptq"
    with pytest.raises(ValueError, match="is_marlin_format"):
        QuantizeConfig.from_quantization_config({**d, "is_marlin_format": True})


def test_reads_old_autogptq_config_with_missing_fields():
    c = QuantizeConfig.from_quantization_config({"bits": 4, "group_size": 128})
    assert c.sym and not c.desc_act and c.damp_percent == 0.01 and c.checkpoint_format == "gptq"


def test_reads_gptqmodel_config():
    d = {"bits": 4, "dynamic": {r"+:.*\.down_proj": {"bits": 8, "group_size": 32, "mse": 2.4},
                                r"-:.*\.gate_proj": {}},
         "group_size": 128, "desc_act": False, "sym": True, "lm_head": False, "quant_method": "gptq",
         "checkpoint_format": "gptq", "pack_dtype": "int32",
         "meta": {"quantizer": ["gptqmodel:2.0.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                  "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": True,
                  "true_sequential": False, "mse": 0.0}}
    c = QuantizeConfig.from_quantization_config(d)
    assert c.damp_percent == 0.05 and c.static_groups and not c.true_sequential
    assert c.resolve("model.layers.1.mlp.down_proj").bits == 8
    assert c.resolve("model.layers.1.mlp.down_proj").group_size == 32
    assert c.resolve("model.layers.1.mlp.gate_proj") is None
    with pytest.raises(ValueError, match="pack_dtype"):
        QuantizeConfig.from_quantization_config({**d, "pack_dtype": "int8"})


def test_act_group_aware_round_trip_and_gptqmodel_meta():
    c = QuantizeConfig(act_group_aware=True)
    d = c.to_quantization_config()
    assert d["desc_act"] is False and d["meta"]["act_group_aware"] is True
    assert QuantizeConfig.from_quantization_config(d).act_group_aware
    # GPTQModel 7 writes it in meta; a desc_act or per-channel checkpoint that
    # also records it still loads (the order is a quantization-time setting).
    gm = {"bits": 4, "group_size": 128, "desc_act": False, "meta": {"act_group_aware": True}}
    assert QuantizeConfig.from_quantization_config(gm).act_group_aware
    for clash in ({"desc_act": True}, {"group_size": -1}):
        c2 = QuantizeConfig.from_quantization_config({**gm, **clash})
        assert not c2.act_group_aware


def test_act_group_aware_default_is_on_where_it_applies():
    assert QuantizeConfig().act_group_aware is None and QuantizeConfig().group_aware_order
    assert not QuantizeConfig(desc_act=True).group_aware_order          # no conflict: resolves off
    assert not QuantizeConfig(group_size=-1).group_aware_order
    assert not QuantizeConfig(act_group_aware=False).group_aware_order   # the paper's natural order
    c = QuantizeConfig(dynamic={r".*\.down_proj": {"group_size": -1}, r".*\.o_proj": {"desc_act": True}})
    assert c.resolve("model.layers.0.mlp.up_proj").act_group_aware is True
    assert c.resolve("model.layers.0.mlp.down_proj").act_group_aware is False
    assert c.resolve("model.layers.0.self_attn.o_proj").act_group_aware is False
    assert QuantizeConfig(act_group_aware=False).resolve("x").act_group_aware is False
    # Written resolved (what GPTQModel reads); a config from a tool without the setting is natural order.
    assert QuantizeConfig().to_quantization_config()["meta"]["act_group_aware"] is True
    assert QuantizeConfig(desc_act=True).to_quantization_config()["meta"]["act_group_aware"] is False
    assert QuantizeConfig.from_quantization_config({"bits": 4, "group_size": 128}).act_group_aware is False


def test_clipping_search_is_on_by_default_but_not_read_into_other_tools_configs():
    assert QuantizeConfig().clip_steps == 16
    assert QuantizeConfig().to_quantization_config()["meta"]["clip_steps"] == 16
    assert QuantizeConfig.from_quantization_config(QuantizeConfig().to_quantization_config()).clip_steps == 16
    assert QuantizeConfig.from_quantization_config({"bits": 4, "group_size": 128}).clip_steps == 0
    assert not QuantizeConfig.from_quantization_config({"bits": 4, "desc_act": True}).group_aware_order


def test_reads_transformers_gptqconfig():
    transformers = pytest.importorskip("transformers")
    d = transformers.GPTQConfig(bits=3, group_size=64, desc_act=True).to_dict()
    c = QuantizeConfig.from_quantization_config(d)
    assert (c.bits, c.group_size, c.desc_act, c.damp_percent) == (3, 64, True, d["damp_percent"])
    assert c.checkpoint_format == "gptq"
    d2 = {"quant_method": "gptq", "bits": 4, "format": "gptq_v2"}
    assert QuantizeConfig.from_quantization_config(d2).checkpoint_format == "gptq_v2"


def test_rejects_other_methods():
    with pytest.raises(ValueError, match="quant_method"):
        QuantizeConfig.from_quantization_config({"quant_method": "awq", "bits": 4})
    with pytest.raises(ValueError, match="checkpoint_format"):
        QuantizeConfig.from_quantization_config({"bits": 4, "checkpoint_format": "marlin"})


def test_resolve_without_dynamic():
    c = QuantizeConfig(bits=3, group_size=64, desc_act=True, damp_percent=0.02, block_size=32)
    s = c.resolve("model.layers.0.self_attn.q_proj")
    assert s == LayerSettings(bits=3, group_size=64, sym=True, desc_act=True, static_groups=False,
                              damp_percent=0.02, block_size=32)
    assert s.as_kwargs() == dict(bits=3, group_size=64, sym=True, desc_act=True, static_groups=False,
                                 damp_percent=0.02, block_size=32, act_group_aware=False)


def test_resolve_dynamic_rules():
    c = QuantizeConfig(bits=4, group_size=128, dynamic={
        r".*\.down_proj": {"bits": 8},
        r"model\.layers\.0\..*": {"group_size": 32, "sym": False},
        r"+:.*\.up_proj": {"desc_act": True},
        r"-:.*\.o_proj": {},
        r".*\.gate_proj": False,
        r".*\.v_proj": {"skip": True},
    })
    # first matching positive pattern wins, no merging
    assert c.resolve("model.layers.0.mlp.down_proj").bits == 8
    assert c.resolve("model.layers.0.mlp.down_proj").group_size == 128
    assert c.resolve("model.layers.0.self_attn.q_proj").group_size == 32
    assert c.resolve("model.layers.0.self_attn.q_proj").sym is False
    assert c.resolve("model.layers.1.self_attn.q_proj").group_size == 128
    assert c.resolve("model.layers.1.mlp.up_proj").desc_act is True
    # skips, with every spelling; skips win over earlier positive matches
    assert c.resolve("model.layers.1.self_attn.o_proj") is None
    assert c.resolve("model.layers.0.self_attn.o_proj") is None
    assert c.resolve("model.layers.1.mlp.gate_proj") is None
    assert c.resolve("model.layers.1.self_attn.v_proj") is None
    # re.match: anchored at the start only
    c2 = QuantizeConfig(dynamic={r"layers\.1\.": {"bits": 2}})
    assert c2.resolve("model.layers.1.mlp.up_proj").bits == 4
    assert c2.resolve("layers.1.mlp.up_proj").bits == 2


def test_dynamic_survives_json(tmp_path):
    c = QuantizeConfig(dynamic={r".*\.gate_proj": False, r"-:lm_head": {}, r".*": {"damp_percent": 0.1}})
    c.save(tmp_path)
    c2 = QuantizeConfig.load(tmp_path)
    # skips are stored as GPTQModel spells them: "-:" keys (it ignores False), ahead of every other
    # rule (it applies the first rule that matches, where gptqkit lets skips win)
    assert list(c2.dynamic.items()) == [(r"-:.*\.gate_proj", {}), (r"-:lm_head", {}), (r".*", {"damp_percent": 0.1})]
    assert c2 == dataclasses.replace(c, act_group_aware=True, dynamic=c2.dynamic)  # act_group_aware as resolved
    assert c2.resolve("x.gate_proj") is None and c2.resolve("lm_head") is None
    assert c2.resolve("x.up_proj").damp_percent == 0.1


def test_dynamic_skips_are_written_first():
    c = QuantizeConfig(dynamic={r".*": {"bits": 8}, r".*\.o_proj": {"skip": True}, r"-:.*\.v_proj": None})
    written = c.to_quantization_config()["dynamic"]
    assert list(written) == [r"-:.*\.o_proj", r"-:.*\.v_proj", r".*"]
    back = QuantizeConfig.from_quantization_config(c.to_quantization_config())
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"):
        assert back.resolve(name) == c.resolve(name)
