"""Caption metrics on generated captions against several references per image.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D come from `pycocoevalcap` exactly as the COCO caption
evaluation runs them (its PTB tokenizer, then its scorers); WER comes from `jiwer`. Nothing here
re-implements a metric: this module only feeds the libraries and names their outputs.

Definitions that are ours (the libraries leave them open):
- Text is compared after the PTB tokenizer (lower case, punctuation removed), for every metric.
- `wer` is the mean over images of the WER against the *closest* reference (the one with the
  lowest WER). `wer_corpus` is jiwer's corpus WER (total edits / total reference words) against
  those same closest references.
- `exact_match` is the fraction of images whose prediction equals one of its references.
- `mean_length` (tokens per prediction), `vocab_size` (distinct tokens over all predictions) and
  `unique_ratio` (distinct predictions / images) expose degenerate output, such as a model that
  writes the same caption for every image.
- `cider` is pycocoevalcap's `Cider`, which *is* CIDEr-D (clipped n-gram counts, Gaussian length
  penalty with sigma 6, times 10). Its IDF comes from the references of the scored set, so score
  a set of images: for a single image CIDEr-D is 0 by construction.
- `spice` is always None: SPICE downloads Stanford CoreNLP models at first use and cannot run
  offline, so it is reported as unavailable instead of failing or being faked.

Java cost: the PTB tokenizer runs once per call for all captions, and one METEOR JVM is started
per process and reused (starting it costs ~10 s). Without Java (`java_available()` is False) the
captions are tokenized by `simple_tokenize` (lower case, punctuation split off and dropped, as the
PTB tokenizer does for captions), every metric but METEOR is computed the same way, and METEOR is
None: the scores stay comparable with each other, and nothing is faked.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import jiwer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioner.errors import CaptionerError

SPICE_NOTE = "SPICE unavailable offline: it downloads Stanford CoreNLP models at first use."
CORPUS_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "wer")
JAVA_HINT = "pycocoevalcap needs Java (apt-get install default-jre-headless)"


@dataclass
class Scores:
    """Corpus scores (one dict) and per-image scores (one dict per prediction, same order)."""

    corpus: dict[str, float | int | None]
    samples: list[dict[str, float]]


def compute(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus scores: bleu_1..bleu_4, meteor, rouge_l, cider (CIDEr-D), wer, exact_match, ..."""
    return score(predictions, references).corpus


def per_sample(predictions: list[str], references: list[list[str]]) -> list[dict]:
    """Per-image bleu_4, meteor, rouge_l, cider (CIDEr-D under the set's IDF), wer, exact_match."""
    return score(predictions, references).samples


def score(predictions: list[str], references: list[list[str]]) -> Scores:
    """Corpus and per-image scores in one pass (one tokenizer run, one METEOR round trip)."""
    _check(predictions, references)
    preds, refs = _tokenize(predictions, references)
    for i, r in enumerate(refs):
        if not r:
            raise CaptionerError(f"image {i} has no non-empty reference caption: {references[i]!r}")
    gts = dict(enumerate(refs))
    res = {i: [p] for i, p in enumerate(preds)}

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, meteor_each = _meteor(gts, res) if java_available() else (None, [None] * len(preds))
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)

    # WER against the closest reference of each image; jiwer does the counting.
    wer_each, closest = [], []
    for p, r in zip(preds, refs, strict=True):
        wer, ref = closest_reference(p, r)
        wer_each.append(wer)
        closest.append(ref)
    exact = [float(bool(p) and p in r) for p, r in zip(preds, refs, strict=True)]
    n = len(preds)
    tokens = [p.split() for p in preds]

    corpus = {f"bleu_{k + 1}": float(bleu[k]) for k in range(4)}
    corpus |= {
        "meteor": None if meteor is None else float(meteor),
        "rouge_l": float(rouge),
        "cider": float(cider),
        "spice": None,
        "wer": sum(wer_each) / n,
        "wer_corpus": float(jiwer.wer(closest, preds)),
        "exact_match": sum(exact) / n,
        "mean_length": sum(map(len, tokens)) / n,
        "vocab_size": len({t for ts in tokens for t in ts}),
        "unique_ratio": len(set(preds)) / n,
        "num_samples": n,
    }
    samples = [
        {
            "bleu_4": float(bleu_each[3][i]),
            "meteor": None if meteor is None else float(meteor_each[i]),
            "rouge_l": float(rouge_each[i]),
            "cider": float(cider_each[i]),
            "wer": float(wer_each[i]),
            "exact_match": exact[i],
        }
        for i in range(n)
    ]
    return Scores(corpus, samples)


def closest_reference(prediction: str, references: list[str]) -> tuple[float, str]:
    """(WER, reference) for the reference closest to `prediction` — jiwer does the counting."""
    return min((jiwer.wer(ref, prediction), ref) for ref in references)


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise CaptionerError("no predictions to score (empty list)")
    if len(predictions) != len(references):
        raise CaptionerError(
            f"{len(predictions)} predictions but {len(references)} reference lists: "
            "give one list of reference captions per prediction"
        )
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(p, str):
            raise CaptionerError(f"prediction {i} is {type(p).__name__}, expected str")
        if isinstance(r, str) or not all(isinstance(c, str) for c in r):
            raise CaptionerError(f"references[{i}] must be a list of strings, got {r!r}")


def _tokenize(
    predictions: list[str], references: list[list[str]]
) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenize every caption in one JVM run (or `simple_tokenize` without Java); drop
    references that tokenize to nothing."""
    if not java_available():
        preds = [simple_tokenize(p) for p in predictions]
        return preds, [[t for t in map(simple_tokenize, r) if t] for r in references]
    # Whitespace is collapsed first: the tokenizer keeps line structure, and a stray '\r' or
    # U+2028 inside a caption would otherwise shift every later caption onto the wrong image.
    captions = {("p", i): [{"caption": " ".join(p.split())}] for i, p in enumerate(predictions)}
    captions |= {
        ("r", i): [{"caption": " ".join(c.split())} for c in r] for i, r in enumerate(references)
    }
    with _captured_stderr() as err:
        try:
            out = PTBTokenizer().tokenize(captions)
        except FileNotFoundError as e:
            raise CaptionerError(f"cannot run the PTB tokenizer: {e}; {JAVA_HINT}") from e
    if any(len(out.get(k, ())) != len(v) for k, v in captions.items()):
        raise RuntimeError(f"PTB tokenizer output does not line up with its input: {err()}")
    preds = [out[("p", i)][0] for i in range(len(predictions))]
    refs = [[c for c in out[("r", i)] if c] for i in range(len(references))]
    return preds, refs


@functools.cache
def java_available() -> bool:
    """pycocoevalcap's PTB tokenizer and METEOR run in a JVM."""
    return shutil.which("java") is not None


def simple_tokenize(caption: str) -> str:
    """The PTB tokenizer's effect on a caption, without Java: lower case, punctuation dropped."""
    tokens = re.findall(r"\w+(?:'\w+)?|[^\w\s]+", caption.lower())
    return " ".join(t for t in tokens if t not in PUNCTUATIONS and not re.fullmatch(r"\W+", t))


@contextlib.contextmanager
def _captured_stderr() -> Iterator:
    """Send fd 2 (where the JVM logs a line per run) to a temp file; yield a reader for it."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lambda: (tmp.seek(0), tmp.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_meteor_lock = threading.Lock()
_meteor_jvm: Meteor | None = None


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """Run pycocoevalcap's Meteor in one JVM kept for the life of the process."""
    global _meteor_jvm
    with _meteor_lock:
        if _meteor_jvm is None or _meteor_jvm.meteor_p.poll() is not None:
            try:
                _meteor_jvm = Meteor()
            except FileNotFoundError as e:
                raise CaptionerError(f"cannot start METEOR: {e}; {JAVA_HINT}") from e
        try:
            return _meteor_jvm.compute_score(gts, res)
        except Exception:
            # Meteor keeps its own lock held when it fails; its __del__ would then hang at exit.
            broken, _meteor_jvm = _meteor_jvm, None
            if broken.lock.locked():
                broken.lock.release()
            _close_meteor(broken)
            raise


def _close_meteor(m: Meteor | None = None) -> None:
    m = m or _meteor_jvm
    if m is not None:
        with m.lock:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()


atexit.register(_close_meteor)
