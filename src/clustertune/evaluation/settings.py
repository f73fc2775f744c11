"""How predictions are made and scored: the `generation` and `rouge` sections of the
evaluation config, and `generate_kwargs` (the generation settings as `model.generate` keyword
arguments). clustertune.evaluation.config re-exports them with the rest of `EvaluateConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from clustertune.config import Validated, at_least, positive
from clustertune.errors import UserError


@dataclass
class GenerationSettings(Validated):
    SECTION: ClassVar[str] = "generation"

    # Tokens generated per example at most (DialogSum summaries: ~25 median, rarely > 100).
    max_new_tokens: int = 128
    # Tokens generated per example at least (0: stop at the first EOS).
    min_new_tokens: int = 0
    # 1: greedy. Beam search costs num_beams x the compute and memory of greedy.
    num_beams: int = 1
    # Sampling makes predictions depend on the seed and on the world size; off for evaluation.
    do_sample: bool = False
    # Used only with do_sample.
    temperature: float = 1.0
    # Used only with do_sample.
    top_p: float = 1.0
    # Used only with do_sample.
    top_k: int = 50
    # Beam search only: > 1 favours longer outputs, < 1 shorter.
    length_penalty: float = 1.0
    # Beam search only: stop when num_beams finished candidates exist.
    early_stopping: bool = False
    # Forbid repeating any n-gram of this size (0: off).
    no_repeat_ngram_size: int = 0
    # > 1 penalises tokens already generated (1: off).
    repetition_penalty: float = 1.0
    # Templates with a thinking switch (Qwen3's enable_thinking): true lets the model reason
    # before answering, false renders the prompt with thinking off; unset: the template's
    # default. Refused for a template without that switch.
    enable_thinking: bool | None = None

    def validate(self) -> None:
        at_least("generation.max_new_tokens", self.max_new_tokens, 1)
        at_least("generation.min_new_tokens", self.min_new_tokens, 0)
        at_least("generation.num_beams", self.num_beams, 1)
        positive("generation.temperature", self.temperature, example=1.0)
        if not 0 < self.top_p <= 1:  # nucleus sampling keeps at least the likeliest token
            raise UserError(f"generation.top_p={self.top_p} must be in (0, 1], e.g. 0.9.")
        at_least("generation.top_k", self.top_k, 0, "0: no top-k filtering")
        at_least("generation.no_repeat_ngram_size", self.no_repeat_ngram_size, 0, "0: off")
        positive("generation.repetition_penalty", self.repetition_penalty, example=1.0)


# The report names of clustertune.rouge's protocols (tests check that the two lists agree).
HeadlineProtocol = Literal["best_reference", "mean_over_references", "first_reference", "evaluate"]


@dataclass
class RougeSettings(Validated):
    SECTION: ClassVar[str] = "rouge"

    # Porter stemming before matching (rouge_score's use_stemmer), in every protocol. true: the
    # transformers summarisation examples and the FLAN-T5 course lab; false: evaluate's default.
    use_stemmer: bool = True
    # Protocol of rouge.json's top-level rouge1..rougeLsum and the table's CI column:
    # best_reference | mean_over_references | first_reference | evaluate (rouge.json's
    # protocol_descriptions says how each is computed).
    headline: HeadlineProtocol = "best_reference"


def generate_kwargs(generation: GenerationSettings) -> dict[str, Any]:
    """Only the settings that apply (transformers warns about e.g. temperature without sampling),
    each passed explicitly, so a model's generation_config.json cannot change them."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "min_new_tokens": generation.min_new_tokens,
        "num_beams": generation.num_beams,
        "do_sample": generation.do_sample,
        "no_repeat_ngram_size": generation.no_repeat_ngram_size,
        "repetition_penalty": generation.repetition_penalty,
        "use_cache": True,  # a config saved with gradient checkpointing may say use_cache=false
    }
    if generation.do_sample:
        kwargs.update(
            temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k
        )
    if generation.num_beams > 1:
        kwargs.update(
            length_penalty=generation.length_penalty, early_stopping=generation.early_stopping
        )
    return kwargs
