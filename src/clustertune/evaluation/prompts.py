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
- chat: the conversation before its last assistant reply, with its tools, rendered with the
  generation prompt (`chat_example`, chat.prompt_text) and the thinking switch
  generation.enable_thinking sets; that reply is the reference unless data.reference_columns
  names columns: its content, or, for a reply that only calls tools, its calls (scored by
  ROUGE on their canonical text and by exact match, chat/replies.py). Training keeps a conversation only up to the last
  reply that fits data.max_length and never cuts inside a turn, so a prompt that leaves its
  reply no room within max_length is not cut either: the row is invalid (refused with its
  file and line, or skipped with data.skip_invalid_rows).
The template is resolved as training resolves it (chat.training_template: a known family's
training copy, the date it renders). Generation stops at the template's end-of-turn tokens
(chat.end_of_turn_ids: <|im_end|>, <|eot_id|>, <|return|> and <|call|>, <end_of_turn>, ...)
as well as at the model's EOS (`stop_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune import chat
from clustertune import data as data_lib
from clustertune.chat import replies
from clustertune.errors import UserError
from clustertune.evaluation.config import EvalDataConfig


@dataclass(frozen=True)
class PromptStyle:
    """How this evaluation renders its prompts (resolved from the config and the tokenizer)."""

    format: str  # "text" | "chat"
    template: Any = None  # chat.ChatTemplate the prompts are rendered with; None: raw text
    template_kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. (("enable_thinking", False),)

    @property
    def chat_template(self) -> bool:
        """Rendered with the chat template and its generation prompt."""
        return self.template is not None

    def describe(self) -> str:
        switches = "".join(f", {k}={v}" for k, v in self.template_kwargs)
        if self.format == "chat":
            return f"conversations up to their last assistant turn, chat template{switches}"
        return "prompt as the user turn, chat template" if self.chat_template else "raw prompt"


def prompt_style(
    data_cfg: EvalDataConfig,
    tokenizer: Any,
    kind: str,
    model_name: str,
    enable_thinking: bool | None = None,
) -> PromptStyle:
    """The style training used for these settings; the tokenizer gets data.chat_template
    (none set: it keeps its own, which with run_dir is the one final/ was trained with) and
    the template is resolved as training resolves it (a known family's training copy, the
    date it renders). Refuses what the model cannot take, before any model is loaded."""
    data_format = data_cfg.format or "text"
    if kind != "causal":
        for key, asked, what in (
            ("data.format", data_format == "chat", "chat conversations"),
            ("data.use_chat_template", data_cfg.use_chat_template is True, "chat templates"),
            ("data.chat_template", bool(data_cfg.chat_template), "chat templates"),
            ("generation.enable_thinking", enable_thinking is not None, "thinking switches"),
        ):
            if asked:
                raise UserError(
                    f"{key}: {what} need a decoder-only model, and '{model_name}' is seq2seq; "
                    f"remove {key}, or evaluate a causal model."
                )
        return PromptStyle("text")
    added = chat.resolve_chat_template(tokenizer, data_cfg.chat_template)
    if added:
        raise UserError(
            f"data.chat_template={data_cfg.chat_template} adds {', '.join(added)} to the "
            f"vocabulary of '{model_name}', which lacks them, so the model has no trained "
            "embeddings for them; evaluate the run trained with this template (run_dir: final/ "
            "saves its tokenizer), or use a template made of tokens the tokenizer has."
        )
    if not chat.uses_chat_template(tokenizer, data_format, data_cfg.use_chat_template, model_name):
        if enable_thinking is not None:
            raise UserError(
                "generation.enable_thinking applies to prompts rendered with a chat template, "
                "and these are raw text; remove it."
            )
        return PromptStyle(data_format)
    template = chat.training_template(
        tokenizer, data_cfg.chat_template, data_cfg.template_date or ""
    )
    kwargs: tuple[tuple[str, Any], ...] = ()
    if enable_thinking is not None:
        if "enable_thinking" not in template.text:
            raise UserError(
                f"generation.enable_thinking: the chat template ({template.origin}) has no "
                "thinking switch (it never reads enable_thinking); remove the setting."
            )
        kwargs = (("enable_thinking", enable_thinking),)
    return PromptStyle(data_format, template, kwargs)


def stop_token_ids(
    tokenizer: Any, style: PromptStyle, model_eos: int | list[int] | None
) -> list[int]:
    """What generation stops at: the template's end-of-turn token(s) first (a reply ends there
    in training), then the model's EOS (generation_config), else the tokenizer's."""
    ids = (
        [] if model_eos is None else [model_eos] if isinstance(model_eos, int) else list(model_eos)
    )
    if style.template is not None:
        ids = [*chat.end_of_turn_ids(tokenizer, style.template), *ids]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return list(dict.fromkeys(ids))


def _prompt(
    tokenizer: Any, style: PromptStyle, conversation: chat.Conversation
) -> tuple[str, list[int]]:
    text = chat.prompt_text(tokenizer, style.template, conversation, **dict(style.template_kwargs))
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def templated_prompt(
    tokenizer: Any, style: PromptStyle, prompt: str, max_source_length: int
) -> tuple[str, list[int], bool]:
    """text + chat template: (the rendered prompt, its ids, whether the prompt was cut)."""
    content, cut = data_lib.cut_text(tokenizer, prompt, max_source_length)
    # The assistant turn only marks where the prompt ends: the prompt is what precedes it.
    turns = chat.Conversation(
        [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
    )
    try:
        text, ids = _prompt(tokenizer, style, turns)
    except chat.TemplateFault as fault:
        raise UserError(
            f"data.use_chat_template: the chat template cannot render an evaluation prompt: {fault}"
        ) from None
    return text, ids, cut


@dataclass(frozen=True)
class ChatExample:
    """One conversation to evaluate: its prompt, and the reply that is its reference."""

    prompt: str
    prompt_ids: list[int]
    reference: str  # the reply's content, or the canonical text of its calls (no content)
    reference_calls: list[dict[str, Any]] | None  # the reply's tool calls, if it makes any
    tools: list[dict[str, Any]] | None  # what the conversation may call (reply parsing)

    @property
    def scores_calls(self) -> bool:
        """ROUGE compares calls (replies.calls_text), not content: a reply that only calls."""
        return bool(self.reference_calls) and self.reference == replies.calls_text(
            self.reference_calls
        )


def chat_example(
    tokenizer: Any, style: PromptStyle, messages: Any, tools: Any, max_length: int
) -> ChatExample | chat.Problem:
    """chat: one conversation's prompt and reference, or why it cannot be evaluated."""
    conversation = chat.parse_conversation(messages, tools)
    if isinstance(conversation, chat.Problem):
        return conversation
    try:
        text, ids = _prompt(tokenizer, style, conversation)
    except chat.TemplateFault as fault:
        return chat.refused_by_template(fault)
    if len(ids) >= max_length:
        return chat.Problem(
            f"is {len(ids)} tokens before its last assistant reply, which leaves the reply no room "
            f"within data.max_length={max_length} (training would not have kept it)"
        )
    reply = conversation.messages[conversation.last_reply_index]
    calls = reply.get("tool_calls")
    reference = reply["content"] if reply["content"].strip() else replies.calls_text(calls)
    if not reference.strip():
        return chat.Problem("ends in an assistant reply with no content or tool call to score")
    return ChatExample(text, ids, reference, calls, conversation.tools)
