"""Train a small WordPiece tokenizer on captions, for from-scratch presets.

A from-scratch model has no reason to carry BERT's 30k-word vocabulary: the output layer (and so
the logits, the softmax and most of the training FLOPs of a tiny decoder) scales with it. A
vocabulary trained on the training captions keeps it to a few hundred entries. The result is a
plain `BertTokenizer` (fast, lower-cased, [CLS] caption [SEP]) — the same shape as
microsoft/git-base's tokenizer, so GIT's processor and generation work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from transformers import BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    captions: Iterable[str], vocab_size: int = 1000, model_max_length: int = 64
) -> BertTokenizer:
    """Return a BERT-style WordPiece tokenizer trained on `captions`.

    `vocab_size` is an upper bound: a small caption set yields fewer tokens (every word it has
    plus the character alphabet), which is the point.
    """
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1
    )
    tok.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return BertTokenizer(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
