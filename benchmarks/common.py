"""What both benchmarks share: where the data and smoke assets are, the T5 shapes, the machine."""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"
TOKENIZERS = ("smoke", "dialogsum-bpe")
# A BPE of this size trained on DialogSum's dev+test texts gives FLAN-T5-like lengths there:
# prompt median 176, summary 24, seed padding efficiency 0.215 (PITFALLS.md: ~160 + prompt,
# ~25, 0.21 measured with FLAN-T5's SentencePiece); the smoke tokenizer gives 270, 42, 0.33.
DIALOGSUM_BPE_VOCAB = 4000

# T5 v1.1 / FLAN-T5 shapes (gated-GELU, untied head); random weights, never downloaded.
SHAPES: dict[str, dict[str, int]] = {
    # The smoke tiny-t5's dimensions: for --quick, which checks that a script works.
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16),
    # ~10 M parameters with the smoke vocabulary: seconds per training step on 2 CPU cores.
    "cpu": dict(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64),
    # ~59 M parameters with the 4000-token BPE: the model states (16 bytes a parameter in fp32
    # with Adam: ~0.9 GiB) outweigh a micro-batch of 4's activations, so sharding them shows.
    "cpu-large": dict(
        d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64
    ),
    # flan-t5-base: 248 M parameters.
    "flan-t5-base": dict(
        d_model=768,
        d_ff=2048,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        d_kv=64,
        vocab_size=32128,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLUSTERTUNE_CACHE") or REPO / ".cache")


def quiet_libraries() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()  # "sequence longer than 512" is expected: we truncate


def load_tokenizer(kind: str, texts: Iterable[str]) -> tuple[Any, str]:
    """The tokenizer and a sentence saying what it is. `texts` trains the dialogsum-bpe one."""
    from transformers import AutoTokenizer

    from clustertune.smoke import build_tokenizer, ensure_smoke_assets

    if kind == "smoke":
        path = ensure_smoke_assets(cache_dir())["tiny_t5"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        return tokenizer, (
            f"the smoke BPE tokenizer ({path}, {len(tokenizer)} tokens): flan-t5's SentencePiece "
            "cannot be downloaded here, and this one splits DialogSum into more tokens than FLAN-T5's"
        )
    tokenizer = build_tokenizer(texts, vocab_size=DIALOGSUM_BPE_VOCAB)
    return tokenizer, (
        f"a {DIALOGSUM_BPE_VOCAB}-token BPE trained on the benchmark's own dialogues and summaries "
        "(clustertune.smoke.build_tokenizer): on DialogSum its lengths match FLAN-T5's SentencePiece "
        "(prompt median ~176, summary ~24; seed padding efficiency 0.215 vs 0.21)"
    )


def load_pairs(source: str) -> tuple[list[dict[str, str]], str]:
    """(dialogue, summary) rows and a sentence saying where they came from."""
    from clustertune.atomicio import read_jsonl
    from clustertune.smoke import ensure_smoke_assets

    dev, test = DIALOGSUM / "dialogsum.dev.jsonl", DIALOGSUM / "dialogsum.test.jsonl"
    if source in ("auto", "dialogsum") and dev.is_file() and test.is_file():
        rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in read_jsonl(dev)]
        # The official test split has three references; summary1 is the training target here.
        rows += [{"dialogue": r["dialogue"], "summary": r["summary1"]} for r in read_jsonl(test)]
        return (
            rows,
            f"DialogSum dev+test ({len(rows)} dialogues, test target = summary1) from {DIALOGSUM}",
        )
    if source == "dialogsum":
        sys.exit(f"--data dialogsum: {dev} and {test} are missing; use --data auto or smoke.")
    train = ensure_smoke_assets(cache_dir())["train"]
    rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in read_jsonl(train)]
    why = "DialogSum not found" if source == "auto" else "--data smoke"
    return rows, f"generated smoke data ({len(rows)} dialogues) from {train} ({why})"


class VocabularyOf:
    """What flan_style_t5 reads of a tokenizer (its length, pad and eos ids), with the
    vocabulary a shape sets: flan-t5-base's 32,128 rows, whatever the tokenizer's size, so
    the embedding and LM head cost what they cost in FLAN-T5."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self.pad_token_id, self.eos_token_id, self.size = (
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            max(size, len(tokenizer)),
        )

    def __len__(self) -> int:
        return self.size


def build_t5(shape: str, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised T5 of `shape`; the same `seed` gives the same weights."""
    from clustertune.smoke.assets import flan_style_t5

    dims = dict(SHAPES[shape])
    if "vocab_size" in dims:
        tokenizer = VocabularyOf(tokenizer, dims.pop("vocab_size"))
    return flan_style_t5(tokenizer, dims, seed)


def save_t5_folder(shape: str, tokenizer: Any, seed: int, path: Path) -> Any:
    """A random T5 of `shape` and its tokenizer saved where model.name_or_path can load them
    (config.json says the head is untied, as clustertune.smoke.build_tiny_t5 writes it)."""
    model = build_t5(shape, tokenizer, seed)
    model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


# Llama shapes (random weights) for the decoder-only benchmarks; the tokenizer's vocabulary
# unless a shape sets its own.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    # the smoke tiny-causal's dimensions
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    # 8.4 M parameters with a 4,000-token vocabulary: about the T5 `cpu` shape's size
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4),
    # ~0.5 B: Qwen2.5-0.5B's dimensions in a Llama (vocabulary 151,936, head tied to the
    # embeddings: 136 M + 24 layers x 14.9 M = 494 M)
    "0.5b": dict(
        vocab_size=151936,
        tie_word_embeddings=True,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
}


def save_llama_folder(
    shape: str, tokenizer: Any, seed: int, path: Path, device: str = "cpu"
) -> Any:
    """A random Llama of `shape` with `tokenizer`'s vocabulary made causal and ChatML (as
    clustertune.smoke builds its tiny-causal), saved where model.name_or_path can load it."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from clustertune.smoke import build_tiny_causal_lm

    build_tiny_causal_lm(tokenizer, path, seed)  # the causal tokenizer, a config to resize
    config = AutoConfig.from_pretrained(path)
    dims = {
        "num_key_value_heads": LLAMA_SHAPES[shape]["num_attention_heads"],
        **LLAMA_SHAPES[shape],
    }
    for key, value in dims.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    for old in Path(path).glob("model*.safetensors*"):  # the tiny weights (a big model shards)
        old.unlink()
    model.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path), model


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device_name": f"{os.cpu_count()} CPU cores ({cpu})",
    }
    if device.type == "cuda":
        info["device_name"] = info["gpu"] = torch.cuda.get_device_name()
    return info


def add_shared_arguments(parser: Any, data_help: str) -> None:
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default="cpu", help="T5 shape (random weights)"
    )
    parser.add_argument(
        "--data", choices=["auto", "dialogsum", "smoke"], default="auto", help=data_help
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="smoke",
        help="smoke: the smoke tiny-t5's; dialogsum-bpe: one with FLAN-T5-like lengths on DialogSum",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core; 1 with --quick). On a busy "
        "machine 1 is several times faster: more threads than free cores wait at every op",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here")


def start(args: Any) -> tuple[torch.device, float]:
    """Quiet the libraries, set the threads; return the device and the 1-min load average."""
    quiet_libraries()
    if args.quick:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), os.getloadavg()[0]


VARIANT_COLOURS = ["#999999", "#6a8fc8", "#d9822b"]  # baseline, common practice, clustertune


def bar_panel(axis: Any, names: list[str], values: list[float], title: str) -> None:
    bars = axis.bar(names, values, color=VARIANT_COLOURS[: len(names)])
    axis.bar_label(
        bars, labels=[f"{x:,.0f}" if x >= 100 else f"{x:.2f}" for x in values], fontsize=8
    )
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelsize=8)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(device: torch.device, load_average_start: float) -> dict[str, Any]:
    """What ran where: the command, the device, and how busy the machine was (1-min load)."""
    import sys

    info = machine(device)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device.type,
        "device_name": info["device_name"],
        "machine": info,
        "load_average_start": load_average_start,
        "load_average_end": os.getloadavg()[0],
    }


def publish(
    results: dict[str, Any],
    json_path: Path | None,
    plot_path: Path | None,
    print_table: Callable[[dict[str, Any]], None],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Print the table, then write the JSON (whole or not at all) and the chart where asked."""
    from clustertune.atomicio import write_json_atomic

    print_table(results)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, results, sort_keys=False)
        print(f"results written to {json_path}")
    if plot_path and plot is not None:
        plot(results, plot_path)
        print(f"chart written to {plot_path}")


# Peak resident memory of this process (CPU runs), per measured phase.
def rss_peak_reset() -> None:
    """Release freed heap to the OS, then restart the kernel's peak-RSS counter (VmHWM)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss_now() -> int:
    return _proc_status_bytes("VmRSS")


def rss_peak() -> int:
    return _proc_status_bytes("VmHWM")
