"""The standard CLIP BPE tokenizer (``load_tokenizer``), and how its files (vocab.json, merges.txt) are built.

Concept extraction aligns words to its tokens; the bundled models and the test pipelines use it as their tokenizer.
The merge list ships inside PyPI packages (open_clip_torch: ``open_clip/bpe_simple_vocab_16e6.txt.gz``).
The result is committed under ``auditor/clip_bpe/`` so nothing needs the package at run time:

    python -m auditor.tokenizer path/to/bpe_simple_vocab_16e6.txt.gz

Vocabulary order follows CLIP: 256 byte symbols, the same with ``</w>``, one entry per merge, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) — 49,408 entries, as in Stable Diffusion.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2
OUT = Path(__file__).resolve().parent / "clip_bpe"


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP reversible byte -> printable unicode mapping.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    # CLIP's vocabulary lists them in this table's insertion order (printable bytes first), not by byte.
    return [chr(c) for c in chars]


def build(gz_path: Path, out: Path = OUT) -> None:
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


def tokenizer_dir() -> Path:
    return OUT


def load_tokenizer(max_length: int = 77):
    """The standard CLIP BPE tokenizer, built from the committed files (no download)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(OUT / "vocab.json"),
        str(OUT / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


if __name__ == "__main__":
    build(Path(sys.argv[1]))
