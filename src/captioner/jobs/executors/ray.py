"""The Ray executor: the images as a Ray Dataset, captioned by a pool of actors on Ray Data.

Each actor holds one `Captioner` (the same engine as the local executor, loaded once per actor
with the job's `LoadOptions`) and captions batch after batch; results stream back to the driver,
which does everything else (rows, shards, sidecars, resume: the caption job). Without `address`
a local Ray instance sized to the machine is started (and stopped at the end); with it, the job
joins that cluster (`ray start --head` on one machine, `ray start --address=...` on the others).
An instance already started in this process (`ray.init()`) is used as it is.

Seeds: each batch seeds torch with `seed + crc32(its image names)` before it is captioned, so a
`do_sample` run is repeatable whichever actor gets which batch (the local executor seeds once:
both are repeatable, they do not sample the same captions). Ray is an optional extra:
`pip install captioner[ray]`.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import ray

from captioner.errors import CaptionerError
from captioner.jobs.executors import ImageFailed, Progress, Result, Results, Work

DEFAULT_BATCH_SIZE = 32  # images per actor call when the job names none


class _CaptionActor:
    """One per Ray actor: loads the model once, captions batch after batch."""

    def __init__(self, work: Work, threads: int) -> None:
        import torch

        from captioner.engine import Captioner
        from captioner.jobs.executors.features import reuse_features

        torch.set_num_threads(threads)
        self.work = work
        self.captioner = Captioner.from_pretrained(work.model, work.load)
        # the actor's machine's cache (a shared folder serves every actor)
        reuse_features(self.captioner, work.model, work.feature_cache)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        # names travel as bytes: Arrow strings must be UTF-8, a file name need not be
        images = [bytes(b).decode("utf-8", "surrogateescape") for b in batch["image"]]
        if self.work.seed is not None:
            import torch

            names = b"\n".join(bytes(b) for b in batch["image"])
            torch.manual_seed((self.work.seed + zlib.crc32(names)) % 2**63)
        # each result as JSON text: Ray's numpy batches would mangle None and ragged lists
        results = [""] * len(images)
        for i, result in self.captioner.caption_iter(
            images, self.work.decoding, batch_size=len(images), num_workers=0
        ):
            failed = isinstance(result, Exception)
            results[i] = json.dumps(
                {"error": getattr(result, "reason", str(result))} if failed else {"ok": result}
            )
        return {"index": list(batch["index"]), "result": results}


def caption_on_ray(
    images: list[str],
    work: Work,
    progress: Progress = None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float = 0.0,
) -> Results:
    """Yield `(index, result)` for `images` as the actors finish their batches (any order).

    `num_workers` actors (default: one per 2 CPUs of the cluster), each with `gpus_per_worker`
    GPUs (> 0 on a GPU cluster: Ray hides GPUs from actors otherwise)."""
    if not isinstance(work.model, str | os.PathLike):
        raise CaptionerError(
            "--engine ray loads the model in each actor: give a model folder or Hub id, "
            "not a loaded Captioner"
        )
    work = Work(str(work.model), work.load, work.decoding, work.batch_size, work.seed)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=None if address else len(os.sched_getaffinity(0)),
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = num_workers or max(1, cpus // 2)
        threads = max(1, cpus // workers)
        items = [{"index": i, "image": os.fsencode(im)} for i, im in enumerate(images)]
        captioned = ray.data.from_items(items).map_batches(
            _CaptionActor,
            fn_constructor_args=(work, threads),
            batch_size=work.batch_size or DEFAULT_BATCH_SIZE,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
            num_gpus=gpus_per_worker or None,
            batch_format="numpy",
        )
        for batch in captioned.iter_batches(batch_size=None, batch_format="numpy"):
            for index, text in zip(batch["index"], batch["result"], strict=True):
                yield int(index), _result(str(text))
            if progress is not None:
                progress(len(batch["index"]))
    finally:
        if started_here:
            ray.shutdown()


def _result(text: str) -> Result:
    answer = json.loads(text)
    return ImageFailed(answer["error"]) if "error" in answer else answer["ok"]
