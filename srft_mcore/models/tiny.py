"""Tiny HF checkpoints for the embedded demo, the doctor and the tests (no download).

The tokenizer is a byte-level BPE trained offline on the embedded arithmetic task's
alphabet and words, shipped in ``srft_mcore/assets/tokenizer``. :func:`make_tiny_hf_model`
writes a random-weight Qwen2, Qwen3 or Llama checkpoint (config, safetensors, tokenizer) that
transformers, SGLang and the bridge all load.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "tokenizer")
EMBEDDED_MODEL_DIR = os.path.join(ASSETS, "embedded_model")
"""The embedded default policy (tools/make_embedded_model.py builds it)."""


def resolve_model_dir(cfg) -> str:
    """The HF directory a run starts from (``cfg``: its Config): model.hf_path, or the
    embedded tiny model."""
    return cfg.model.hf_path or EMBEDDED_MODEL_DIR

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def _corpus():
    """Training text: the embedded task (prompts, demonstrations, the think system prompt,
    chat roles) dominates so its words and numbers become single tokens; a little generic
    text and arithmetic keep other inputs from falling apart into bytes."""
    from srft_mcore.data.embedded import generate_embedded
    from srft_mcore.data.templates import THINK_SYSTEM_PROMPT

    words = ("Compute the value of step so answer is then we get first next finally "
             "Let us add subtract multiply plus minus times equals result think "
             "The quick brown fox jumps over the lazy dog Hello world user assistant system "
             "Please reason step by step and put your final answer within boxed "
             "Question Answer System User Assistant").split()
    lines = []
    for a in range(0, 100, 7):
        for b in range(1, 40, 3):
            lines.append(f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}.")
    lines.append(" ".join(words) + " \\boxed{42} ( ) [ ] { } < > : ; , . ? ! = + - * /")
    for rec in generate_embedded(600, seed=12345, min_steps=1, max_steps=3,
                                 max_value=48):
        text = (f"system\n{THINK_SYSTEM_PROMPT}\nuser\n{rec['prompt']}\nassistant\n"
                f"{rec['demonstration']}")
        for special in SPECIAL_TOKENS:  # split out before BPE at encode time as well
            text = text.replace(special, " ")
        lines.append(text)
    # every value the task can produce, as it appears in the answer box
    lines.extend(f"\\boxed{{{n}}}" for n in range(60) for _ in range(4))
    return lines * 2


def build_tokenizer(out_dir: str = TOKENIZER_DIR, vocab_size: int = 512) -> str:
    """Train the byte-level BPE tokenizer offline and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", bos_token=None)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return out_dir


VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
               "vocab.txt")
"""Any one of these holds a tokenizer's vocabulary (or vocab.json with merges.txt)."""


class MissingTokenizer(FileNotFoundError):
    """A model directory without the tokenizer files (an input error, reported in one
    paragraph)."""


def check_tokenizer_files(model_dir: str) -> None:
    """Raise MissingTokenizer naming what is missing from a local model directory.

    transformers 5 does not fail on such a directory: it builds an empty tokenizer (or one
    with default special tokens) that only breaks much later, e.g. inside SGLang.
    """
    if not os.path.isdir(model_dir):
        return  # a hub id or a single file: transformers reports it
    has = set(os.listdir(model_dir))
    missing = []
    if not has & set(VOCAB_FILES) and not {"vocab.json", "merges.txt"} <= has:
        detail = " (vocab.json without merges.txt)" if "vocab.json" in has else ""
        missing.append(f"a vocabulary file{detail}: one of {', '.join(VOCAB_FILES)} or "
                       f"vocab.json + merges.txt")
    if "tokenizer_config.json" not in has:
        missing.append("tokenizer_config.json (the special tokens, e.g. the end-of-sequence "
                       "token that stops rollouts)")
    if missing:
        raise MissingTokenizer(
            f"model directory {model_dir} has no usable tokenizer: missing "
            f"{'; and '.join(missing)}. The trainer and the SGLang servers read the tokenizer "
            f"from the model directory. Fix: copy the tokenizer files of the base model this "
            f"checkpoint comes from into {model_dir} (tokenizer.json and "
            f"tokenizer_config.json, and chat_template.jinja, vocab.json/merges.txt or "
            f"tokenizer.model where the base model has them)")


def load_tokenizer(path: Optional[str] = None):
    """The tokenizer of a HF model directory (default: the shipped tiny tokenizer)."""
    from transformers import AutoTokenizer

    if path is not None:
        check_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path or TOKENIZER_DIR)


def tiny_hf_config(arch: str = "qwen2", vocab_size: Optional[int] = None, hidden_size: int = 64,
                   num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                   intermediate_size: int = 128, tied: bool = False,
                   rope_theta: float = 10000.0, max_position_embeddings: int = 1024,
                   head_dim: Optional[int] = None):
    """A transformers config object for a tiny Qwen2 (qkv bias, GQA), Qwen3 (q/k norms, no
    qkv bias, GQA) or Llama model. ``head_dim`` (default ``hidden_size // num_heads``) may
    differ from that quotient."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    tok = load_tokenizer()
    common = dict(vocab_size=vocab_size or len(tok), hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6, rope_theta=rope_theta,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id,
                  pad_token_id=tok.pad_token_id)
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":  # Qwen3Config's default head_dim is 128, whatever the hidden size
        return Qwen3Config(**{"head_dim": hidden_size // num_heads, **common},
                           attention_bias=False, use_sliding_window=False)
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    raise ValueError(f"tiny models exist for qwen2, qwen3 and llama, not {arch!r}. "
                     f"Fix: pass arch='qwen2', 'qwen3' or 'llama'")


def make_tiny_hf_model(out_dir: str, arch: str = "qwen2", seed: int = 0, dtype: str = "float32",
                       **config_kwargs) -> str:
    """Write a random tiny HF checkpoint (config, model.safetensors, tokenizer) to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():  # HF's default init is tiny (std 0.02): widen it so logits differ
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(out_dir, name))
    return out_dir


if __name__ == "__main__":
    print(build_tokenizer())
