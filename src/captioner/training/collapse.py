"""Noticing when fine-tuning collapses: the model gives every image the same caption.

A captioner that has stopped looking at its images writes the corpus's most common caption for
all of them (a known failure of fine-tuned GIT and CoCa models). Its loss can still look
reasonable, so the guard reads the *generated* captions: `diversity` measures how many distinct
captions (and word n-grams) an evaluation produced, and `CollapseGuard` watches those numbers in
the metrics of each training evaluation (`eval_unique_ratio`, `eval_num_samples`). When the unique
ratio stays below the threshold for `patience` evaluations in a row it warns with the likely
causes and, with `stop=True`, ends training; `load_best_model_at_end` then restores the best
checkpoint, which is the point of stopping instead of training on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from transformers import TrainerCallback

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.1
# Below this many captions a low ratio is noise (with 10 images, 1 distinct caption is 0.1).
DEFAULT_MIN_IMAGES = 20
DEFAULT_PATIENCE = 2
_WORD = re.compile(r"\w+(?:'\w+)*")

LIKELY_CAUSES = (
    "a learning rate too high (training diverged to one caption: try it 3-10x lower) or too low "
    "/ too few steps (the model still writes its prior: train longer or raise it); "
    "captions or a prompt that are (nearly) the same for every image; labels that are all "
    "masked (-100) or do not match the images"
)


def _words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def diversity(captions: Sequence[str]) -> dict[str, float]:
    """How varied a set of generated captions is.

    `unique_ratio`: distinct captions / captions (case, spacing and punctuation ignored);
    `distinct_1`, `distinct_2`: distinct word unigrams / bigrams over all unigrams / bigrams
    (Li et al., 2016). All three are 0.0 for no captions; a collapsed model scores 1/N, ~0, ~0.
    """
    if not captions:
        return {"unique_ratio": 0.0, "distinct_1": 0.0, "distinct_2": 0.0}
    words = [_words(c) for c in captions]
    return {
        "unique_ratio": len({tuple(w) for w in words}) / len(words),
        "distinct_1": _distinct(words, 1),
        "distinct_2": _distinct(words, 2),
    }


def _distinct(words: list[list[str]], n: int) -> float:
    grams = [tuple(w[i : i + n]) for w in words for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class CollapseGuard(TrainerCallback):
    """Warn (and with `stop`, end training) when evaluations keep producing one caption.

    Reads `{prefix}_unique_ratio` and `{prefix}_num_samples` from the metrics every evaluation
    reports; an evaluation without them is ignored. `streak` counts consecutive evaluations below
    `threshold` (an evaluation of fewer than `min_images` captions neither counts nor breaks it);
    at `patience` the guard warns once, sets `collapsed` and, with `stop`, asks the Trainer to
    stop. A recovered evaluation resets the streak.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        min_images: int = DEFAULT_MIN_IMAGES,
        patience: int = DEFAULT_PATIENCE,
        stop: bool = False,
        prefix: str = "eval",
    ) -> None:
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.threshold = threshold
        self.min_images = min_images
        self.patience = patience
        self.stop = stop
        self.prefix = prefix
        self.streak = 0
        self.collapsed = False
        self.steps: list[int] = []  # steps of the evaluations in the current streak

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ratio = (metrics or {}).get(f"{self.prefix}_unique_ratio")
        if ratio is None:
            return
        images = metrics.get(f"{self.prefix}_num_samples")
        if images is not None and images < self.min_images:
            return  # too few captions to tell collapse from chance
        step = getattr(state, "global_step", 0)
        if ratio >= self.threshold:
            self.streak, self.steps = 0, []
            return
        self.streak += 1
        self.steps.append(step)
        if self.streak < self.patience:
            return
        if self.streak == self.patience:
            self._warn(ratio, images, getattr(args, "learning_rate", None))
        self.collapsed = True
        if self.stop:
            control.should_training_stop = True

    def _warn(self, ratio: float, images, learning_rate) -> None:
        where = ", ".join(str(s) for s in self.steps)
        lr = f" (learning rate {learning_rate:g})" if learning_rate is not None else ""
        count = f" of {int(images)} eval images" if images is not None else ""
        then = (
            "Stopping: the best checkpoint is kept"
            if self.stop
            else "Training goes on (--stop_on_collapse would stop it)"
        )
        log.warning(
            "caption collapse: unique caption ratio %.3f%s, below %g for %d evaluations in a "
            "row (steps %s): the model gives (nearly) every image the same caption%s. "
            "Likely causes: %s. %s.",
            ratio,
            count,
            self.threshold,
            self.patience,
            where,
            lr,
            LIKELY_CAUSES,
            then,
        )
