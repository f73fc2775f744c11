"""The family x conversation-kind table: every chat template the installed TRL ships, on every
conversation kind of clustertune.smoke.conversations, as a training run would encode it.

    python benchmarks/chat_templates.py [--markdown]

Each cell: `=` the labels equal transformers' assistant mask from the template with
generation markers (the family's own, or TRL's training copy), token for token; `~` trained
by rendering prefixes (no marked version exists; each reply's text trained); `-` refused,
with the reason below the table (the template itself rejects the row, or cannot render it as
the continuation of its prefixes); `!` trained but not equal to the reference (a bug). The
tests (tests/test_chat_families.py) assert the same cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def cell(tokenizer, template, row) -> tuple[str, str]:
    from clustertune import chat

    conversation = chat.parse_conversation(row["messages"], row.get("tools"))
    encoded = chat.encode_conversation(
        tokenizer, template, conversation, train_on="assistant", max_length=1 << 20
    )
    if isinstance(encoded, chat.Problem):
        return "-", str(encoded)
    if template.mask != chat.MASK_MARKERS:
        return "~", ""
    from clustertune.smoke.conversations import transformers_mask

    input_ids, mask = transformers_mask(tokenizer, template.text, row)
    labels = [int(label != chat.IGNORE_INDEX) for label in encoded.labels]
    same = encoded.input_ids == input_ids and labels == mask
    return ("=" if same else "!"), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    from clustertune import chat
    from clustertune.chat.template import _trl_templates
    from clustertune.errors import UserError
    from clustertune.modeling import load_tokenizer
    from clustertune.smoke import ensure_smoke_assets
    from clustertune.smoke.conversations import CONVERSATION_KINDS

    base = str(ensure_smoke_assets()["tiny_causal"])
    kinds = list(CONVERSATION_KINDS)
    reasons: dict[str, list[str]] = {}
    lines = []
    sep = " | " if args.markdown else "  "
    header = ["family", "mask", *kinds]
    lines.append(sep.join(header))
    if args.markdown:
        lines.append(sep.join("---" for _ in header))
    counts = {"=": 0, "~": 0, "-": 0, "!": 0}
    families = sorted(name for name in _trl_templates() if not name.endswith("_training"))
    for family in families:
        tokenizer = load_tokenizer(base)
        tokenizer.chat_template = _trl_templates()[family]
        try:
            template = chat.training_template(tokenizer)
        except UserError as error:
            lines.append(sep.join([family, "refused", *("-" for _ in kinds)]))
            reasons.setdefault(str(error)[:160], []).append(family)
            continue
        marks = []
        for kind in kinds:
            mark, why = cell(tokenizer, template, CONVERSATION_KINDS[kind])
            counts[mark] += 1
            marks.append(mark)
            if why:
                reasons.setdefault(why[:160], []).append(f"{family}/{kind}")
        how = "TRL copy" if "TRL" in template.origin else template.mask.split()[0]
        lines.append(sep.join([family, how, *marks]))
    print("\n".join(lines))
    print(f"\ncells: {counts}")
    for why, where in reasons.items():
        print(f"- {why}: {', '.join(where)}")


if __name__ == "__main__":
    main()
