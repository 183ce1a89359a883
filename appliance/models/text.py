"""Tokenising report text for the text encoder.

Production loads the tokenizer that ships with the local BERT folder (CXR-BERT). Without one, a
WordPiece vocabulary is learnt from the site's own de-identified reports and the label prompts
(the `tokenizers` library, nothing downloaded) and saved beside the run, so evaluation and
export tokenise exactly as training did.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from appliance.errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_IMPRESSION = re.compile(r"^\s*IMPRESSION\s*:", re.IGNORECASE | re.MULTILINE)
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&-]{2,40})[ \t]*:", re.MULTILINE)


def impression_first(report: str) -> str:
    """Move the IMPRESSION section to the front, so truncation at max tokens cuts findings, not impression."""
    match = _IMPRESSION.search(report)
    if not match:
        return report.strip()
    return (report[match.start():].strip() + "\n" + report[:match.start()].strip()).strip()


def report_sections(report: str) -> dict[str, str]:
    """{HEADING: text} for the capitalised `HEADING:` sections of a report (empty when it has none)."""
    marks = list(_HEADING.finditer(report))
    return {m.group(1).strip().upper(): report[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(report))].strip()
            for i, m in enumerate(marks)}


def training_text(report: str, impression_first_order: bool = True) -> str:
    """The part of a report the text encoder learns from: IMPRESSION and FINDINGS (as CT-RATE
    uses), impression first; header lines (exam, history, technique, placeholders) are left out
    so they do not use up the token budget. A report without those headings is used whole."""
    sections = report_sections(report)
    impression = sections.get("IMPRESSION") or sections.get("CONCLUSION") or ""
    findings = sections.get("FINDINGS", "")
    if not impression and not findings:
        return report.strip()
    parts = [impression, findings] if impression_first_order else [findings, impression]
    return "\n".join(p for p in parts if p)


class TextTokenizer:
    """A transformers fast tokenizer with the one call training needs."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def build_site_tokenizer(corpus: Sequence[str], vocab_size: int = 3000, max_length: int = 128) -> TextTokenizer:
    """A lower-cased BERT-style WordPiece tokenizer whose vocabulary comes from the given texts.

    The vocabulary is built here rather than by `tokenizers`' WordPiece trainer, whose tie-breaking
    follows hash-map order and changes from run to run (so would the token ids, and with them every
    trained weight): special tokens, then every character seen (as itself and as a `##`
    continuation), then whole words by falling frequency and alphabetically, up to vocab_size.
    Words outside it fall back to characters.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in corpus:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab_list = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    room = max(0, vocab_size - len(vocab_list))
    vocab_list += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:room]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)
    return TextTokenizer(fast, max_length)


def load_tokenizer(folder: Path, max_length: int = 128) -> TextTokenizer:
    """The tokenizer saved in a local folder (a BERT checkpoint's, or a run's site tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer folder {folder} not found")
    try:
        return TextTokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True), max_length)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer in {folder} cannot be loaded: {str(exc).splitlines()[0]}") from None
