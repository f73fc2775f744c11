"""How an eval row becomes the prompt a model generates from: the way training rendered it.

Three styles, chosen as training chooses them (training_data.tokenize_spec):
- text, raw: prompt_template over the row, tokenised with the tokenizer's special tokens and
  cut to max_source_length keeping its start: through data.tokenize_dataset, training's own
  code (evalset.py). Seq2seq models always; decoder-only ones whose tokenizer has no chat
  template, or with data.use_chat_template=false.
- text + chat template (decoder-only): the prompt text cut before its max_source_length-th
  token, as training cuts it (data.cut_text), rendered as the user turn followed by the
  template's generation prompt (`templated_prompt`). The cut falls inside the user's content,
  so the prompt always ends with the generation prompt the model was trained to answer.
- chat: the conversation before its last assistant reply, rendered with the generation
  prompt (`chat_prompt`, chat.prompt_ids); that reply is the reference unless
  data.reference_columns names columns. Training keeps a conversation only up to the last
  reply that fits data.max_length and never cuts inside a turn, so a prompt that leaves its
  reply no room within max_length is not cut either: the row is invalid (refused with its
  file and line, or skipped with data.skip_invalid_rows).
Generation stops at the template's end-of-turn token (chat.end_of_turn_ids, e.g. <|im_end|>)
as well as at the model's EOS (`stop_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune import chat
from clustertune import data as data_lib
from clustertune.errors import UserError
from clustertune.evaluation.config import EvalDataConfig


@dataclass(frozen=True)
class PromptStyle:
    """How this evaluation renders its prompts (resolved from the config and the tokenizer)."""

    format: str  # "text" | "chat"
    chat_template: bool  # rendered with the tokenizer's chat template and generation prompt

    def describe(self) -> str:
        if self.format == "chat":
            return "conversations up to their last assistant turn, chat template"
        return "prompt as the user turn, chat template" if self.chat_template else "raw prompt"


def prompt_style(
    data_cfg: EvalDataConfig, tokenizer: Any, kind: str, model_name: str
) -> PromptStyle:
    """The style training used for these settings; the tokenizer gets data.chat_template
    (none set: it keeps its own, which with run_dir is the one final/ was trained with).
    Refuses what the model cannot take, before any model is loaded."""
    data_format = data_cfg.format or "text"
    if kind != "causal":
        for key, asked, what in (
            ("data.format", data_format == "chat", "chat conversations"),
            ("data.use_chat_template", data_cfg.use_chat_template is True, "chat templates"),
            ("data.chat_template", bool(data_cfg.chat_template), "chat templates"),
        ):
            if asked:
                raise UserError(
                    f"{key}: {what} need a decoder-only model, and '{model_name}' is seq2seq; "
                    f"remove {key}, or evaluate a causal model."
                )
        return PromptStyle("text", False)
    added = chat.resolve_chat_template(tokenizer, data_cfg.chat_template)
    if added:
        raise UserError(
            f"data.chat_template={data_cfg.chat_template} adds {', '.join(added)} to the "
            f"vocabulary of '{model_name}', which lacks them, so the model has no trained "
            "embeddings for them; evaluate the run trained with this template (run_dir: final/ "
            "saves its tokenizer), or use a template made of tokens the tokenizer has."
        )
    use_template = chat.uses_chat_template(
        tokenizer, data_format, data_cfg.use_chat_template, model_name
    )
    return PromptStyle(data_format, use_template)


def stop_token_ids(
    tokenizer: Any, style: PromptStyle, model_eos: int | list[int] | None
) -> list[int]:
    """What generation stops at: the template's end-of-turn token(s) first (a reply ends there
    in training), then the model's EOS (generation_config), else the tokenizer's."""
    ids = (
        [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
    )
    if style.chat_template:
        ids = [*chat.end_of_turn_ids(tokenizer), *ids]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return list(dict.fromkeys(ids))


def templated_prompt(
    tokenizer: Any, prompt: str, max_source_length: int
) -> tuple[str, list[int], bool]:
    """text + chat template: (the rendered prompt, its ids, whether the prompt was cut)."""
    content, cut = data_lib.cut_text(tokenizer, prompt, max_source_length)
    # The assistant turn only marks where the prompt ends: prompt_ids renders what precedes it.
    turns = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    try:
        ids = chat.prompt_ids(tokenizer, turns)
    except UserError as error:
        raise UserError(f"data.use_chat_template: {error}") from None
    return chat.render(tokenizer, turns[:1], generation_prompt=True), ids, cut


def chat_prompt(tokenizer: Any, messages: Any, max_length: int) -> tuple[str, list[int]] | str:
    """chat: (the rendered prompt, its ids) of one conversation, or why it cannot be evaluated."""
    problem = chat.messages_problem(messages)
    if problem is not None:
        return problem
    messages = chat.clean_messages(messages)
    try:
        ids = chat.prompt_ids(tokenizer, messages)
    except UserError as error:
        return f"cannot be rendered ({error})"
    if len(ids) >= max_length:
        return (
            f"is {len(ids)} tokens before its last assistant reply, which leaves the reply no room "
            f"within data.max_length={max_length} (training would not have kept it)"
        )
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return chat.render(tokenizer, messages[:last], generation_prompt=True), ids


def last_reply(messages: list[dict[str, Any]]) -> str:
    """The content of a (valid) conversation's last assistant turn: its reference."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
