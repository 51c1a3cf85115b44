"""A tiny Llama-architecture model built locally, for tests and the demo.

No hub access is needed: a byte-level BPE tokenizer is trained with
``tokenizers`` on a small generated corpus, a chat template is attached, and a
``LlamaForCausalLM`` is randomly initialised from a ``LlamaConfig``. The result
is an ordinary Hugging Face model folder, loaded by the same code path as any
hub model. head_dim is 32, which vLLM's CPU attention accepts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from loraflow.registry.errors import InvalidArgumentError, MissingDependencyError

IM_START, IM_END, PAD, BOS = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|begin_of_text|>"

# ChatML. `{% generation %}` marks the assistant tokens (and the end-of-turn
# token after them) so TRL can compute the loss on exactly those.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

_WORDS = (
    "the a an of to in and is was for on with as by at from name city age email order status price item "
    "customer ship paid pending total date user id json extract field value text summary answer question "
    "alice bob carol dave erin frank grace heidi ivan judy paris berlin tokyo lima oslo rome cairo delhi "
    "system user assistant you are a helpful extract qty ordered items from customer"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]))
        key, value, n = rng.choice(_WORDS), rng.choice(_WORDS), rng.randint(0, 999)
        out.append(f'{{"{key}": "{value}", "n": {n}}}')
    out += [str(n) for n in range(1000)]
    return out


def build_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write a tiny Llama model folder (config, safetensors weights, tokenizer, chat template).

    ``out_dir`` must be a new or empty folder, unless ``overwrite``: a model's files are never
    mixed into a folder that holds others."""
    check_out_dir(out_dir, overwrite=overwrite)
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as exc:
        raise MissingDependencyError("building the tiny model needs pip install 'loraflow[train]'") from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, IM_START, IM_END]
    tok.train_from_iterator(
        _corpus(seed),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        dtype="float32",
        **(TINY_CONFIG | {"max_position_embeddings": max_position_embeddings}),
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def check_out_dir(out_dir: Path, *, overwrite: bool = False) -> None:
    """A folder to write a model into: not a file, and empty unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"{out_dir} is a file; name a new folder for the model", param="OUT_DIR")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise InvalidArgumentError(
            f"{out_dir} is not empty; name a new or empty folder, or pass --force to write into it",
            param="OUT_DIR",
        )


def random_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    seed: int = 0,
    target_modules: list[str] | str = "all-linear",
    **lora_kwargs: Any,
) -> Path:
    """Save an untrained but non-trivial PEFT LoRA adapter (B is random, not zero) for ``base_dir``."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise MissingDependencyError("making an adapter needs pip install 'loraflow[train]'") from exc

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
