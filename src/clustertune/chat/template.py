"""Which chat template a run renders with, how its trained tokens are located, and the
template's own faults (refused naming the template, never blamed on the data).

The trained tokens come, in this order of preference, from
1. `{% generation %}` markers in the template (the tokenizer's own, or a `data.chat_template`
   file): transformers records the character span of each marked block while rendering, so
   one render locates every reply (encode.py);
2. the training copy a well-kept library ships for a known family: TRL keeps generation-marked,
   prefix-preserving copies of the current families' templates and picks one by matching the
   tokenizer's template byte for byte (`trl.chat_template_utils.get_training_chat_template`).
   The copy renders each reply with its own reasoning, where the inference template drops
   earlier reasoning (Qwen3, DeepSeek-R1), so every reply is trained as the model writes it;
3. rendering each prefix of the conversation, for an unknown template without markers: the
   characters between the render before a reply (with the generation prompt) and the render
   up to it are the reply. This needs a template whose render of a conversation continues the
   render of each shorter prefix, and costs a render per reply; a template that is not so is
   refused with the remedy (a template file with generation markers).

The tokenizer keeps its own (inference) template: final/ saves it for deployment, and a run
resolves the same training copy from it again (evaluation, resume), so the choice is stable.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from clustertune.errors import UserError

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
MASK_MARKERS = "generation markers"
MASK_PREFIXES = "prefix renders"

# ChatML (Qwen, SmolLM2, many others): the built-in for tokenizers without a template. Each
# reply and its end-of-turn token are marked for the loss; the newline after it is not.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

PROBE_REPLY = "clustertune-probe-reply"
PROBE_USER = "clustertune-probe-question"


@dataclass(frozen=True)
class ChatTemplate:
    """The template a run renders conversations with, and how its masks are found."""

    text: str  # the Jinja source rendered (a training copy where one is used)
    origin: str  # where it comes from, for the log and for errors
    mask: str  # MASK_MARKERS | MASK_PREFIXES
    path: str | None = None  # the file it was read from, if any
    date: str | None = None  # the date rendered where the template writes today's date

    def describe(self) -> str:
        how = (
            "trained tokens from its {% generation %} markers, one render per conversation"
            if self.mask == MASK_MARKERS
            else "trained tokens located by rendering each prefix (a render per reply; a "
            "template with {% generation %} markers costs one)"
        )
        dated = f"; renders the date {self.date}" if self.date else ""
        return f"chat template: {self.origin}; {how}{dated}"

    def identity(self) -> dict[str, str]:
        """What a resume must find unchanged (the run's fingerprint records it)."""
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:16]
        record = {"chat.template": f"{self.origin} (sha256 {digest})", "chat.mask": self.mask}
        if self.date:
            record["chat.date"] = self.date
        return record


def resolve_chat_template(
    tokenizer: Any, setting: str, key: str = "data.chat_template"
) -> list[str]:
    """Give the tokenizer the template `setting` names: a built-in, or a Jinja file (empty:
    keep its own). The built-in ChatML's markers become special tokens if the vocabulary
    lacks them, so that each is one token; returns those added (the model's embeddings must
    grow to match, and their rows be trained)."""
    if not setting:
        return []
    if setting in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[setting]
        vocabulary = tokenizer.get_vocab()
        missing = [token for token in CHATML_TOKENS if token not in vocabulary]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
        return missing
    path = Path(setting).expanduser()
    if not path.is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        raise UserError(
            f"{key}='{setting}' is neither a built-in template ({names}) nor a Jinja file; give "
            "the path of a .jinja file, a built-in name, or leave it empty for the tokenizer's own."
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{key}: the template file '{path}' is empty; give a Jinja chat template.")
    tokenizer.chat_template = text
    return []


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_template_available(
    tokenizer: Any, model_name: str, key: str = "data.chat_template"
) -> None:
    if not has_chat_template(tokenizer):
        raise UserError(
            f"data.format=chat: the tokenizer of '{model_name}' has no chat template; set "
            f"{key}=chatml (built in) or {key}=<file.jinja>."
        )


def uses_chat_template(
    tokenizer: Any, data_format: str, use_chat_template: bool | None, model_name: str
) -> bool:
    """Whether rows are rendered with the chat template, for training and evaluation alike:
    conversations always; text rows when data.use_chat_template says so (null: when the
    tokenizer has one). A template that is asked for and missing is refused."""
    if data_format == "chat" or use_chat_template:
        check_template_available(tokenizer, model_name)
    if data_format == "chat":
        return True
    return has_chat_template(tokenizer) if use_chat_template is None else use_chat_template


def template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: the default one
        return template.get("default") or next(iter(template.values()))
    return template


# ------------------------------------------------------------------ Jinja faults


class TemplateFault(Exception):
    """The template itself failed (a syntax error, an undefined name, raise_exception)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line

    def __str__(self) -> str:
        return f"{self.message} (template line {self.line})" if self.line else self.message


def template_fault(error: BaseException) -> TemplateFault:
    """A Jinja error as one message and the template line it happened on. Jinja rewrites
    tracebacks so that template frames carry the template's own line numbers."""
    import jinja2

    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, jinja2.TemplateSyntaxError):
        return TemplateFault(f"{type(error).__name__}: {message}", error.lineno)
    line, trace = None, error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == "<template>":
            line = trace.tb_lineno
        trace = trace.tb_next
    return TemplateFault(f"{type(error).__name__}: {message}", line)


def compile_template(text: str) -> Any:
    """transformers' compiled template (its sandbox, filters and `{% generation %}` tracker)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        return _compile_jinja_template(text)
    except Exception as error:  # jinja2.TemplateSyntaxError and friends
        raise template_fault(error) from None


# ------------------------------------------------------------------ the date some templates render


_STRFTIME = re.compile(r"strftime_now\(\s*(['\"])(.*?)\1\s*\)")


def pin_date(text: str, date: str) -> str:
    """`text` rendering `date` wherever it calls strftime_now (gpt-oss writes "Current date"):
    a macro of that name, defined on the first line so that line numbers stay the file's, shadows
    transformers' clock-reading global. The same row then tokenises the same on any day."""
    formats = sorted({match.group(2) for match in _STRFTIME.finditer(text)})
    if not formats:
        return text
    day = datetime.strptime(date, "%Y-%m-%d")
    branches = "".join(
        f"{'{%- if' if i == 0 else '{%- elif'} format == {fmt!r} %}}{day.strftime(fmt)}"
        for i, fmt in enumerate(formats)
    )
    return f"{{%- macro strftime_now(format) %}}{branches}{{%- endif %}}{{%- endmacro %}}" + text


def renders_date(text: str) -> bool:
    return bool(_STRFTIME.search(text))


# ------------------------------------------------------------------ known families (TRL)


@functools.lru_cache(maxsize=1)
def _trl_templates() -> dict[str, str]:
    """{file stem: text} of the templates the installed TRL ships (empty without TRL)."""
    try:
        import trl
    except ImportError:
        return {}
    folder = Path(trl.__file__).parent / "chat_templates"
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.jinja"))}


def trl_template(name: str) -> str:
    """The template TRL ships as `<name>.jinja` (e.g. qwen3, or qwen3_training)."""
    templates = _trl_templates()
    if name not in templates:
        raise UserError(
            f"the installed TRL ships no chat template '{name}'; pip install 'trl>=1.16'."
        )
    return templates[name]


def known_family(text: str) -> str | None:
    """The family whose original template `text` is, byte for byte (TRL's file name)."""
    return next(
        (
            name
            for name, known in _trl_templates().items()
            if known == text and not name.endswith("_training")
        ),
        None,
    )


def training_copy(tokenizer: Any) -> tuple[str, str] | None:
    """(family, training template) from TRL for the tokenizer's template, or None."""
    text = template_text(tokenizer)
    family = known_family(text)
    if family is None:
        return None
    from trl.chat_template_utils import get_training_chat_template

    try:
        training = get_training_chat_template(tokenizer)
    except ValueError:  # a family TRL recognises but ships no training copy for (gemma4, llama3_1)
        return None
    return (family, training) if training else None
