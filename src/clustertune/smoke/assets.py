"""The smoke tokenizer and tiny models, and the cache that builds every smoke asset once.

`build_tokenizer` trains a T5-style BPE tokenizer on the generated data; `build_tiny_t5` and
`build_tiny_causal_lm` save a tiny T5 encoder-decoder and a tiny Llama next to it.
`ensure_smoke_assets` builds the data splits and both models under a cache folder: each folder
is built aside, stamped with `SMOKE_VERSION` and renamed into place under a file lock, so
concurrent callers never see half-written or stale assets. torch, tokenizers and transformers
are imported inside the builders, so the cached path stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustertune.atomicio import file_lock, read_jsonl
from clustertune.smoke.agents import ensure_agent_data
from clustertune.smoke.chats import ensure_chat_data
from clustertune.smoke.dialogues import ensure_smoke_data
from clustertune.smoke.scenarios import AGENT_SPLITS, CHAT_SPLITS, SPLITS

if TYPE_CHECKING:  # imported inside functions: the cached path stays fast (no torch import)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

# Bump when the generator, tokenizer or model shapes change: cached folders with another
# stamp are rebuilt instead of silently serving stale assets.
# 2: tiny T5 config.json says tie_word_embeddings=false. 3: chat data; the tiny Llama's
# tokenizer has a ChatML template, <|im_start|>/<|im_end|> tokens and eos <|im_end|>, and its
# head starts at unit logit scale. The T5 and the dialogue data are unchanged since 2.
# 4: agent data (tool calls, reasoning) and the tiny Llama with Qwen3's template.
SMOKE_VERSION = "4"
_STAMP_FILE = ".smoke_version"

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as T5 expects
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # the causal tokenizer's last two ids

# ChatML as Qwen2.5-Instruct and SmolLM2 write it (whitespace control and all), without
# Qwen's default system prompt: a turn is `<|im_start|>role\ncontent<|im_end|>\n`, and the
# generation prompt opens an assistant turn. It marks no `{% generation %}` spans, like most
# published templates, so the assistant-only mask cannot rely on them.
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A T5-style BPE tokenizer trained on `texts`: `<pad>`=0, `</s>`=1, `<unk>`=2, and `</s>`
    appended to every encoded sequence.

    Pre-tokenization is SentencePiece-like (spaces become `▁`, kept inside tokens) with
    newlines split off as their own token, so decoding restores the text exactly and a
    frequent word such as `#Person1#:` becomes a single token. The result depends only on
    `texts`: the same texts give the same ids in every build.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            # "first": no `▁` after a newline, so "a\nb" decodes back to "a\nb", not "a \n b".
            pre_tokenizers.Metaspace(prepend_scheme="first"),
        ]
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        # Every printable ASCII character, so unseen words split into characters, not <unk>.
        initial_alphabet=sorted(set(string.printable) - set(string.whitespace) | {"▁", "\n"}),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, backend.token_to_id(EOS))],
    )
    return _wrap(backend)


def _wrap(
    backend: Tokenizer, padding_side: str = "right", **settings: Any
) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    settings = {
        "pad_token": PAD,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": 512,  # the longest smoke dialogue is ~330 tokens
        **settings,
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,  # decoding is already exact
        **settings,
    )


def _causal_tokenizer(
    tokenizer: PreTrainedTokenizerFast, padding_side: str
) -> PreTrainedTokenizerFast:
    """The same vocabulary without the automatic `</s>`, plus ChatML, as Qwen2.5-Instruct has.

    A decoder-only example is prompt + target in one sequence, so the collator appends
    `tokenizer.eos_token_id` to the target itself; an automatic `</s>` after the prompt would
    teach the model to stop before answering. `<|im_start|>` and `<|im_end|>` are added as
    special tokens (ids len(vocab) and len(vocab) + 1, each one token wherever it appears,
    never split or merged with text) and `<|im_end|>` is the eos: the end of an assistant
    turn is where generation stops, and what a text-format target ends with. The pad stays
    `<pad>` (id 0), distinct from eos, so a padded batch never hides a trained end-of-turn.
    """
    from tokenizers import AddedToken, Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B", special_tokens=[]
    )
    # Added to the backend in this order, so the ids are fixed before transformers sees them.
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in (IM_START, IM_END)]
    )
    return _wrap(
        backend,
        padding_side,
        eos_token=IM_END,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,  # the tiny Llama's positions; chat data.max_length defaults to 1024
    )


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


TINY_T5_SHAPE = {
    "d_model": 64,
    "d_ff": 128,
    "d_kv": 16,  # 4 heads * 16 = d_model
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
}


def flan_style_t5(tokenizer: Any, shape: dict[str, int], seed: int) -> Any:
    """A randomly initialised T5 v1.1 / FLAN-T5-style model (gated-GELU, its own LM head) of
    `shape`; the same seed gives the same weights. Also what the benchmarks build."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        **shape,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / FLAN-T5
        tie_word_embeddings=False,  # T5 v1.1 / FLAN-T5
        dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    # transformers 5 forces `config.tie_word_embeddings=True` for T5 and reads our False as
    # "v1.1: do not scale decoder outputs"; the head is then tied to `shared` at init. Give it
    # its own weights, as FLAN-T5 checkpoints have, so both tensors are saved and loading keeps
    # them apart (explicit `tie_weights()`/`resize_token_embeddings()` would re-tie them, as
    # they would FLAN-T5's). std d_model**-0.5 puts initial logits at unit scale: loss ~ ln(V).
    if model.lm_head.weight is model.shared.weight:
        lm_head = torch.empty_like(model.shared.weight).normal_(std=config.d_model**-0.5)
        model.lm_head.weight = torch.nn.Parameter(lm_head)
    return model


def build_tiny_t5(tokenizer: PreTrainedTokenizerFast, path: Path, seed: int = 0) -> Path:
    """Save a 2+2-layer, 64-dim T5 v1.1-style model (gated-GELU, untied head) and the tokenizer."""
    model = flan_style_t5(tokenizer, TINY_T5_SHAPE, seed)
    # Say in config.json what the weights are, as FLAN-T5's config does: transformers 4 reads
    # `true` as "tie the head to `shared` and scale decoder outputs", which would discard the
    # head saved here. Only the file changes: the tensors saved are the same. (transformers 5
    # still forces True when loading T5 and logs "will NOT tie"; clustertune.quiet explains.)
    model.config.tie_word_embeddings = False
    path = Path(path)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return path


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast, path: Path, seed: int = 0, padding_side: str = "right"
) -> Path:
    """Save a 2-layer, 64-dim Llama and its tokenizer: `tokenizer`'s vocabulary without the
    automatic `</s>`, with ChatML (`_causal_tokenizer`).

    `padding_side="right"` suits training; batched generation wants "left", which a recipe
    can set on the loaded tokenizer. As Qwen2.5-Instruct: config eos `<|im_end|>`, generation
    stops at `<|im_end|>` or the base's end of text `</s>`, pad `<pad>`.
    """
    return _save_tiny_llama(_causal_tokenizer(tokenizer, padding_side), Path(path), seed)


# The tokens Qwen3's tokenizer adds for its template's reasoning and tool-call blocks (added,
# not special: a decoded reply keeps them, and generation does not stop at them).
QWEN3_ADDED_TOKENS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)


def build_tiny_qwen3(tokenizer: PreTrainedTokenizerFast, path: Path, seed: int = 0) -> Path:
    """The tiny Llama with Qwen3's chat template, byte for byte as the installed TRL ships it
    (qwen3.jinja: reasoning blocks, Hermes-style tool calls, tool results as user turns) and
    Qwen3's added tokens: a model of a current family, offline. Training renders its rows
    through TRL's generation-marked training copy, which TRL picks by that exact match."""
    from tokenizers import AddedToken

    from clustertune.chat.template import known_family, trl_template

    tokenizer = _causal_tokenizer(tokenizer, "right")
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS]
    )
    tokenizer.chat_template = trl_template("qwen3")
    assert known_family(tokenizer.chat_template) == "qwen3"
    return _save_tiny_llama(tokenizer, Path(path), seed)


def _save_tiny_llama(tokenizer: PreTrainedTokenizerFast, path: Path, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 1,322 BPE tokens + <|im_start|>, <|im_end|> (+ added)
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,  # longest dialogue + summary ~370 tokens, conversation 441
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,  # the smoke tokenizer has no BOS
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Llama's init (std 0.02) gives the head rows of norm 0.02 * 64**0.5 = 0.16 behind a final
    # RMSNorm (hidden norm 8): logits stay within +-1.3, so a LoRA run, which trains neither
    # head nor norm, cannot go far below ln(V). std d_model**-0.5, as the tiny T5's head, puts
    # initial logits at unit scale (loss ~ ln(V) + 0.5) and lets adapters reach confident ones.
    # Measured, smoke/chat_lora.yaml at lr 3e-3: eval loss 7.21 -> 6.34 before, 7.75 -> 2.52 now.
    with torch.no_grad():
        model.lm_head.weight.normal_(std=config.hidden_size**-0.5)
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(EOS),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLUSTERTUNE_CACHE") or Path.home() / ".cache" / "clustertune")


def _is_current(folder: Path) -> bool:
    stamp = folder / _STAMP_FILE
    return stamp.is_file() and stamp.read_text().strip() == SMOKE_VERSION


def _publish(build_dir: Path, final: Path) -> None:
    """Stamp a finished build and rename it into place, replacing a stale folder if any."""
    (build_dir / _STAMP_FILE).write_text(SMOKE_VERSION + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for file in build_dir.iterdir():  # save_pretrained writes 0600 weights; a cache may be shared
        file.chmod(0o666 & ~umask)
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(build_dir, final)


_FOLDERS = {  # under smoke/
    "data": "data",
    "tiny_t5": "tiny-t5",
    "tiny_causal": "tiny-causal",
    "tiny_qwen3": "tiny-qwen3",
}
_BUILDERS = {
    "tiny_t5": build_tiny_t5,
    "tiny_causal": build_tiny_causal_lm,
    "tiny_qwen3": build_tiny_qwen3,
}


def missing_smoke_asset_hint(path: str | os.PathLike) -> str | None:
    """For a missing path inside a smoke cache (`<cache>/smoke/tiny-t5`, `.../smoke/data/...`):
    what to run to build the assets. None for any other path."""
    parts = Path(path).parts
    for index in range(len(parts) - 1):
        if parts[index] == "smoke" and parts[index + 1] in _FOLDERS.values():
            cache = Path(*parts[:index]) if index else Path(".")
            return (
                f"the smoke assets are missing ('{path}' is one of them); build them with "
                f"`make assets` or `python -m clustertune.smoke --cache-dir {cache}`."
            )
    return None


def ensure_smoke_assets(cache_dir: Path | None = None) -> dict[str, Path]:
    """Build (once) and return the smoke data splits and the two tiny models.

    Layout under `cache_dir` (default `$CLUSTERTUNE_CACHE` or `~/.cache/clustertune`):
    `smoke/data/{train,validation,test}.jsonl` (dialogues),
    `smoke/data/chat_{train,validation,test}.jsonl` (conversations), `smoke/tiny-t5/`,
    `smoke/tiny-causal/`.
    Each folder is built in a temporary folder and renamed into place under a file lock, so
    concurrent callers never see half-written assets. Returns at once when present; building
    takes ~2 s plus importing torch and transformers.
    """
    root = Path(cache_dir or default_cache_dir()) / "smoke"
    folders = {key: root / name for key, name in _FOLDERS.items()}
    splits = (*SPLITS, *CHAT_SPLITS, *AGENT_SPLITS)
    paths = {split: folders["data"] / f"{split}.jsonl" for split in splits}
    paths |= {key: folders[key] for key in _BUILDERS}
    if all(_is_current(folder) for folder in folders.values()):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):  # builders on one cache: ranks, test workers
        tokenizers: dict[str, PreTrainedTokenizerFast] = {}
        for key, folder in folders.items():  # data first: the tokenizer is trained on it
            if _is_current(folder):
                continue  # present, or another process built it while we waited for the lock
            build_dir = root / f".build-{folder.name}-{os.getpid()}"  # not mkdtemp: mode 0700
            shutil.rmtree(build_dir, ignore_errors=True)  # left by a crashed run with our pid
            build_dir.mkdir()
            try:
                if key == "data":
                    ensure_smoke_data(build_dir)
                    ensure_chat_data(build_dir)
                    ensure_agent_data(build_dir)
                else:
                    # tiny-qwen3's vocabulary also learns the JSON of tool calls and schemas
                    vocabulary = "agent" if key == "tiny_qwen3" else "dialogue"
                    if vocabulary not in tokenizers:
                        tokenizers[vocabulary] = _smoke_tokenizer(
                            paths["train"], paths["agent_train"] if vocabulary == "agent" else None
                        )
                    _BUILDERS[key](tokenizers[vocabulary], build_dir)
                _publish(build_dir, folder)
            finally:
                shutil.rmtree(build_dir, ignore_errors=True)
    return paths


def _smoke_tokenizer(train_path: Path, agent_path: Path | None = None) -> PreTrainedTokenizerFast:
    """The smoke tokenizer, trained on the train split's dialogues and summaries (not on the
    chat data: the T5 assets stay what they were before the chat data existed); with
    `agent_path`, also on the agent rows as JSON, so that tool schemas and calls are words of
    the vocabulary as in real tokenizers, not characters."""
    rows = read_jsonl(train_path)
    texts = [text for row in rows for text in (row["dialogue"], row["summary"])]
    if agent_path is not None:
        texts += [json.dumps(row) for row in read_jsonl(agent_path)]
    return build_tokenizer(texts)
