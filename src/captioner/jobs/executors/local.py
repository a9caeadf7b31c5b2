"""The local executor: one `Captioner` in this process, batch after batch (`caption_iter`, with
its background image loader)."""

from __future__ import annotations

from captioner.jobs.executors import Progress, Results, Work


def caption_here(images: list[str], work: Work, progress: Progress = None) -> Results:
    """Yield `(index, result)` for `images` in input order; the model loads on the first
    request. `work.seed` seeds torch once, so a `do_sample` run is repeatable."""
    import torch  # here, not at import: the CLI imports the job module for its --help

    from captioner.engine import Captioner
    from captioner.jobs.executors.features import reuse_features

    captioner = work.model
    if not isinstance(captioner, Captioner):
        captioner = Captioner.from_pretrained(work.model, work.load)
        # a loaded Captioner keeps the feature source its owner gave it (or none)
        reuse_features(captioner, work.model, work.feature_cache)
    if work.seed is not None:
        torch.manual_seed(work.seed)
    yield from captioner.caption_iter(
        images, work.decoding, batch_size=work.batch_size, progress=progress
    )
