"""Metrics pinned by hand-checkable cases and by pycocoevalcap's own COCOEvalCap-style run."""

from __future__ import annotations

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.errors import CaptionerError
from captioner.evaluation import metrics

# Each image's words appear in no other image's references, so CIDEr-D's IDF is positive for
# every n-gram and the per-image values below follow from its definition by hand.
HAND = [
    ("identical", "a red cat sits on the mat", ["a red cat sits on the mat"]),
    ("disjoint", "green frogs jump high", ["blue whales swim deep"]),
    (
        "one_of_two",
        "two dogs run in snow",
        ["an old man reads books quietly", "two dogs run in snow"],
    ),
    ("empty", "", ["snowy peaks glow"]),
    ("normalised", "Yellow Kites, Flying!", ["yellow kites flying"]),
]


@pytest.fixture(scope="module")
def hand() -> metrics.Scores:
    return metrics.score([p for _, p, _ in HAND], [r for _, _, r in HAND])


def sample(scores: metrics.Scores, name: str) -> dict:
    return scores.samples[[n for n, _, _ in HAND].index(name)]


def test_identical_prediction_scores_top(hand):
    s = sample(hand, "identical")
    assert s["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert s["meteor"] == pytest.approx(1.0)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["cider"] == pytest.approx(10.0)  # cosine 1 for n=1..4, no length penalty, x10
    assert s["wer"] == 0.0
    assert s["exact_match"] == 1.0


def test_disjoint_words_score_zero(hand):
    s = sample(hand, "disjoint")
    assert s["bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert s["meteor"] == 0.0
    assert s["rouge_l"] == 0.0
    assert s["cider"] == 0.0
    assert s["wer"] == 1.0  # four substitutions over four reference words
    assert s["exact_match"] == 0.0


def test_one_matching_reference_among_several(hand):
    s = sample(hand, "one_of_two")
    # BLEU, METEOR, ROUGE-L and WER take the best reference...
    assert s["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert s["meteor"] == pytest.approx(1.0)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["wer"] == 0.0
    assert s["exact_match"] == 1.0
    # ...CIDEr-D averages over references: (1 + 0) / 2 * 10.
    assert s["cider"] == pytest.approx(5.0)


def test_empty_prediction_scores_zero_not_error(hand):
    s = sample(hand, "empty")
    assert (s["bleu_4"], s["meteor"], s["rouge_l"], s["cider"]) == pytest.approx((0, 0, 0, 0))
    assert s["wer"] == 1.0
    assert s["exact_match"] == 0.0


def test_case_and_punctuation_are_normalised(hand):
    s = sample(hand, "normalised")
    assert s["exact_match"] == 1.0
    assert s["wer"] == 0.0


def test_corpus_aggregates(hand):
    c = hand.corpus
    assert set(metrics.CORPUS_KEYS) <= set(c)
    assert c["spice"] is None  # unavailable offline, reported as such
    assert c["wer"] == pytest.approx((0 + 1 + 0 + 1 + 0) / 5)  # mean of closest-reference WER
    # corpus WER over the closest references: 4 + 3 errors over 7 + 4 + 5 + 3 + 3 words
    assert c["wer_corpus"] == pytest.approx(7 / 22)
    assert c["exact_match"] == pytest.approx(3 / 5)
    assert c["mean_length"] == pytest.approx((7 + 4 + 5 + 0 + 3) / 5)
    assert c["vocab_size"] == 7 + 4 + 5 + 3
    assert c["num_samples"] == 5
    # a 3-word caption has no 4-grams: CIDEr-D averages n = 1..4, so (1 + 1 + 1 + 0) / 4 * 10
    assert hand.samples[4]["cider"] == pytest.approx(7.5)
    assert c["cider"] == pytest.approx((10 + 0 + 5 + 0 + 7.5) / 5)


def test_input_errors_are_clear():
    with pytest.raises(CaptionerError, match="no predictions"):
        metrics.compute([], [])
    with pytest.raises(CaptionerError, match="2 predictions but 1"):
        metrics.compute(["a", "b"], [["a"]])
    with pytest.raises(CaptionerError, match="list of strings"):
        metrics.compute(["a"], ["a"])
    with pytest.raises(CaptionerError, match="image 1 has no non-empty reference"):
        metrics.compute(["a b", "c d"], [["a b"], ["", " ... "]])


def test_line_breaks_inside_captions_do_not_shift_images():
    # The PTB tokenizer works line by line; a '\r' must not move later captions to other images.
    preds = ["a small\rred boat", "tall green trees", "an orange moon"]
    refs = [["a small red boat"], ["tall green trees"], ["an orange\u2028moon"]]
    scores = metrics.per_sample(preds, refs)
    assert [s["exact_match"] for s in scores] == [1.0, 1.0, 1.0]


# A small fixed set with several references per image, scored as pycocoevalcap's COCOEvalCap
# does it (tokenize gts and res, then each scorer), minus SPICE which needs a download.
FIXED_PREDS = [
    "a man riding a wave on top of a surfboard",
    "a plate of food with broccoli and rice",
    "two giraffes standing next to each other",
    "a red bus driving down the street",
    "a cat laying on a laptop computer",
    "a bunch of bananas",
]
FIXED_REFS = [
    ["A surfer rides a large wave.", "a man on a surfboard riding a wave", "Surfing on a wave."],
    ["A plate with broccoli, rice and chicken.", "food on a white plate"],
    ["Two giraffes stand in a field.", "two giraffes next to a tree", "giraffes in the zoo"],
    ["A double decker bus on a city street.", "a red bus going down the road"],
    ["A cat sleeping on a keyboard.", "a cat lies on top of an open laptop"],
    ["Yellow bananas hanging in a market.", "a bunch of ripe bananas on a table"],
]


def test_corpus_scores_equal_cocoevalcap():
    gts = {i: [{"caption": c} for c in refs] for i, refs in enumerate(FIXED_REFS)}
    res = {i: [{"caption": p}] for i, p in enumerate(FIXED_PREDS)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    expected, per_image = {}, {}
    for scorer, names in [
        (Bleu(4), ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]),
        (Meteor(), ["meteor"]),
        (Rouge(), ["rouge_l"]),
        (Cider(), ["cider"]),
    ]:
        score, scores = scorer.compute_score(gts, res)
        if len(names) == 1:
            score, scores = [score], [scores]
        expected |= dict(zip(names, score, strict=True))
        per_image |= dict(zip(names, scores, strict=True))

    got = metrics.score(FIXED_PREDS, FIXED_REFS)
    for name, value in expected.items():
        assert got.corpus[name] == pytest.approx(value, rel=1e-9), name
    for name in ["bleu_4", "meteor", "rouge_l", "cider"]:
        assert [s[name] for s in got.samples] == pytest.approx(list(per_image[name]), rel=1e-9)


def _scene(i: int) -> tuple[str, list[str]]:
    """A generated-scene-like image: two coloured shapes on a background, five paraphrases."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    backs = ["white", "black", "grey"]
    c1, c2 = colours[i % 6], colours[(i // 6 + 1 + i) % 6]
    s1, s2 = shapes[i % 4], shapes[(i // 4 + 1) % 4]
    bg = backs[i % 3]
    refs = [
        f"a {c1} {s1} and a {c2} {s2} on a {bg} background",
        f"a {c2} {s2} next to a {c1} {s1}",
        f"there is a {c1} {s1} and a {c2} {s2}",
        f"{c1} {s1} with a {c2} {s2} on {bg}",
        f"two shapes: a {c1} {s1} and a {c2} {s2}",
    ]
    return f"a {c1} {s1} and a {c2} {s2} on {bg}", refs


def test_constant_caption_scores_far_below_a_good_predictor():
    scenes = [_scene(i) for i in range(24)]
    refs = [r for _, r in scenes]
    good = metrics.compute([p for p, _ in scenes], refs)
    constant = metrics.compute(["a red circle and a blue square on a white background"] * 24, refs)
    assert good["cider"] > 1.0
    assert good["cider"] > 4 * constant["cider"]
    assert good["bleu_4"] > constant["bleu_4"]
    # The degenerate-output signals show it too.
    assert constant["unique_ratio"] == pytest.approx(1 / 24)
    assert constant["vocab_size"] < good["vocab_size"]
