"""Train a small byte-level BPE tokenizer on captions, for from-scratch decoders.

A from-scratch model has no reason to carry a 30k- or 50k-token vocabulary: the output layer (and
so the logits, the softmax and most of the training FLOPs of a tiny decoder) scales with it. A
vocabulary trained on the training captions keeps it to a few hundred entries.

The tokenizer is lossless and cased: 🤗 tokenizers' BPE over a `ByteLevel` pre-tokenizer and
decoder, with no lower-casing or Unicode normalisation, the 256 byte symbols always in the
vocabulary and no unknown token, so `decode(encode(text), skip_special_tokens=True) == text` for
any Unicode text (accents, CJK, emoji, `it's`, `t-rex`, `woman: light skin tone`, trigger words
such as `sks` or `1girl`). Special tokens written in a caption (`[SEP]`) are read as plain text
(`split_special_tokens`), so they round-trip too. (The WordPiece it replaces lower-cased,
stripped accents, spaced or lost `: - ' ( )` and turned every unseen character into [UNK].)

A word is one token wherever it stands, as it was with WordPiece: the text always gets one
leading space before it is split (`Prepend(" ")`, SentencePiece's "always" scheme) and the
decoder takes exactly that one off again (`Strip`), so `red` is `Ġred` at the start of a caption
too, and a caption after a prompt ("a picture of" + " a red circle") is the same ids as the
caption alone. (With GPT-2's rule a first word would be a different token from the same word
later on.) Prepending even before a leading space keeps it lossless: " x" is `Ġ Ġx`.

It is saved as a plain fast tokenizer (`tokenizer.json`, loaded by `AutoTokenizer`) with the
shape GIT's and VisionEncoderDecoder's code expect of microsoft/git-base's BERT tokenizer:
`[CLS] caption [SEP]` from its post-processor, `cls_token`/`sep_token` (also its `bos_token`/
`eos_token`) and `pad_token`, so `GitProcessor`, `VisionTextDualEncoderProcessor`, generation and
the families' start/end handling work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

PAD, CLS, SEP = "[PAD]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = [PAD, CLS, SEP]


def train_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 1000, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """Return a lossless byte-level BPE tokenizer trained on `captions` (`[CLS] text [SEP]`).

    `vocab_size` is an upper bound: a small caption set yields fewer tokens (the 256 bytes, the
    special tokens and the merges its words need), which is the point. Below 256 + 3 it is the
    byte alphabet alone.
    """
    tok = Tokenizer(BPE())
    # Always one leading space (even before a space: ByteLevel's add_prefix_space would skip
    # that, and " x" and "x" would encode alike); the decoder removes exactly that one.
    tok.normalizer = normalizers.Prepend(" ")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B {SEP}",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        cls_token=CLS,
        sep_token=SEP,
        bos_token=CLS,
        eos_token=SEP,
        model_max_length=model_max_length,
        # decode() must not touch spaces (" ." -> "." would break the round trip)
        clean_up_tokenization_spaces=False,
        # "[SEP]" inside a caption is text, not the end token
        split_special_tokens=True,
    )
