"""Tiny randomly initialised causal LMs (and a tiny tokenizer) for fast tests.

Nothing is downloaded: every model is built from a transformers config with
hidden size 64, 2 blocks and a vocabulary of 128 tokens, in float32, in eval
mode, with a fixed seed, so that two calls with the same arguments return
identical weights.

Usage::

    from tiny_models import ARCHITECTURES, make_tiny_model, make_tiny_tokenizer
    model = make_tiny_model("llama")                 # LlamaForCausalLM
    model = make_tiny_model("gpt2", n_layer=3)       # config overrides
    tok = make_tiny_tokenizer()                      # character-level, ids < 128

``ARCHITECTURES`` lists the dense families (``MOE_ARCHITECTURES`` the
Mixture-of-Experts ones); ``EXPECTED`` holds, per
architecture, the decoder-block path, the Linear-like layers of one block and
the true-sequential groups discovery is expected to find (written out by hand
from the transformers modelling code).
"""

from __future__ import annotations

import string

import torch

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 128
EXPERTS = 4
MAX_POS = 256


def _configs():
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=FFN,
                  max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    gqa = dict(common, num_key_value_heads=KV_HEADS)
    return {
        "llama": lambda: T.LlamaConfig(**gqa),
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=None),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=HIDDEN // HEADS),
        "gemma": lambda: T.GemmaConfig(**gqa, head_dim=HIDDEN // HEADS),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=HIDDEN // HEADS, sliding_window=64),
        "gemma3_text": lambda: T.Gemma3TextConfig(**gqa, head_dim=HIDDEN // HEADS, sliding_window=64),
        "phi": lambda: T.PhiConfig(**gqa),
        "phi3": lambda: T.Phi3Config(**gqa),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, ffn_dim=FFN, word_embed_proj_dim=HIDDEN,
                                   max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=2,
                                   eos_token_id=3),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                     n_inner=FFN, n_positions=MAX_POS, bos_token_id=2, eos_token_id=3),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                            num_attention_heads=HEADS, intermediate_size=FFN,
                                            max_position_embeddings=MAX_POS, pad_token_id=1,
                                            bos_token_id=2, eos_token_id=3),
        # Mixture-of-Experts: 4 experts, 2 per token; transformers 5 fuses each block's experts into 3-D tensors
        "mixtral": lambda: T.MixtralConfig(**gqa, num_local_experts=EXPERTS, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**gqa, moe_intermediate_size=FFN // 2, num_experts=EXPERTS,
                                              num_experts_per_tok=2, shared_expert_intermediate_size=FFN,
                                              decoder_sparse_step=1),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**gqa, head_dim=HIDDEN // HEADS, moe_intermediate_size=FFN // 2,
                                              num_experts=EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1),
        # GPT-OSS experts: interleaved gate/up, transposed, with biases and a clamped custom gate
        "gpt_oss": lambda: T.GptOssConfig(**dict(gqa, intermediate_size=FFN // 2), head_dim=HIDDEN // HEADS,
                                          num_local_experts=EXPERTS, num_experts_per_tok=2,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }


#: Mixture-of-Experts families (gptqkit.moe splits their experts into per-expert layers)
MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox", "phi", "phi3",
                 "gemma", "gemma2", "gemma3_text")

_LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 ["self_attn.o_proj"],
                 ["mlp.gate_proj", "mlp.up_proj"],
                 ["mlp.down_proj"]]

#: arch -> (blocks_path, true-sequential groups in execution order)
EXPECTED = {
    "llama": ("model.layers", _LLAMA_GROUPS),
    "mistral": ("model.layers", _LLAMA_GROUPS),
    "qwen2": ("model.layers", _LLAMA_GROUPS),
    "qwen3": ("model.layers", _LLAMA_GROUPS),
    "gemma": ("model.layers", _LLAMA_GROUPS),
    "gemma2": ("model.layers", _LLAMA_GROUPS),
    "gemma3_text": ("model.layers", _LLAMA_GROUPS),
    "opt": ("model.decoder.layers",
            [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
    "gpt2": ("transformer.h",
             [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
    "gpt_neox": ("gpt_neox.layers",
                 [["attention.query_key_value"], ["attention.dense"],
                  ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]]),
    # Phi runs attention and MLP in parallel on the same normed input, so fc1
    # shares q/k/v's input tensor and joins their group.
    "phi": ("model.layers",
            [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"],
             ["self_attn.dense"], ["mlp.fc2"]]),
    "phi3": ("model.layers",
             [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]),
}


def make_tiny_config(arch: str, **overrides):
    """The transformers config of tiny model ``arch`` with ``overrides`` applied."""
    configs = _configs()
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(configs)}")
    cfg = configs[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised ``AutoModelForCausalLM`` of family ``arch``, in eval mode.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        seed: initialisation seed (same seed, same weights).
        dtype: parameter dtype.
        **overrides: config attributes to change (e.g. ``num_hidden_layers=3``).
    """
    from transformers import AutoModelForCausalLM

    cfg = make_tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        _give_zero_biases_values(model)
    return model.eval()


def _give_zero_biases_values(model) -> None:
    """GPT-OSS initialises its expert biases to zero; a trained model's are not, and tests must see
    whether each bias reaches the right expert and row."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")) and not p.any():
                p.normal_(0.0, 0.05)


def make_tiny_tokenizer(model_max_length: int = MAX_POS):
    """A character-level ``PreTrainedTokenizerFast`` with ids below :data:`VOCAB`.

    Ids: 0 ``<unk>``, 1 ``<pad>``, 2 ``<s>`` (BOS, added at the start when
    ``add_special_tokens=True``), 3 ``</s>``, 4 newline, then printable ASCII.
    Unknown characters map to ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [c for c in string.printable if c not in "\n\r\t\x0b\x0c"]
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Oniguruma syntax: (?m) lets "." match newlines too
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 2)])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)
