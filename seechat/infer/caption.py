"""Batch captioning through the engine: every image of some inputs into a captions JSONL.

An input is any mix of: a folder (every image under it; ids are paths relative to it), a `.jsonl`
list of `{"image": path}` (ids as written), a `.txt` list of paths (one per line, ids as written),
webdataset shards (`x.tar`, `'shards/{00000..00009}.tar'`, `'shards/*.tar'`; ids are sample keys),
or single image files (ids as given). Folders, JSONL lists and shards are read exactly as
`seechat eval winrate` reads its held-out images, so the output rows

    {"image": <id>, "caption": <text>}

are directly a method's captions file for the win-rate experiment. Requests stream into the
engine, which batches them continuously; rows are written in input order as they finish.
`resume=True` skips ids already in the output file and appends the rest.

What this module is not: the command line (`seechat caption`, in `seechat.cli.caption`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from seechat.data.image_sources import FileImages, ImageSource, is_image_file, open_image_source
from seechat.data.images import ImageError
from seechat.data.jsonl import iter_jsonl

log = logging.getLogger(__name__)
DEFAULT_PROMPT = "请用一句话描述这张图片。"


def open_inputs(inputs: list[str], image_root: str | None = None) -> Iterator[tuple[str, ImageSource]]:
    """(id, source) for every image of every input, in order."""
    root = Path(image_root) if image_root else None
    files: list[str] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file() and is_image_file(p):
            files.append(spec)
            continue
        if files:
            src = FileImages(files)
            yield from ((i, src) for i in src.ids)
            files = []
        src = open_image_source(spec, image_root=root)
        yield from ((i, src) for i in src.ids)
    if files:
        src = FileImages(files)
        yield from ((i, src) for i in src.ids)


@dataclass
class _Job:
    image_id: str
    done: threading.Event = field(default_factory=threading.Event)
    parts: list[str] = field(default_factory=list)
    error: str | None = None

    def sink(self, ev) -> None:
        self.parts.append(ev.text)
        if ev.finish_reason is not None:
            if ev.finish_reason in ("error", "timeout", "abort"):
                self.error = ev.error or ev.finish_reason
            self.done.set()


def caption(
    engine,
    processor,
    inputs: list[str],
    out: str | Path,
    prompt: str = DEFAULT_PROMPT,
    params=None,
    resume: bool = False,
    image_root: str | None = None,
    window: int = 64,
    progress: bool = True,
) -> dict:
    """Caption every input image into `out`; returns counts {"written", "skipped", "failed"}.

    Unreadable images and failed generations are logged (WARNING) and counted, never fatal; a
    missing input raises FileNotFoundError, an unusable one ValueError."""
    from tqdm import tqdm

    from seechat.infer.chat import prompt_ids
    from seechat.infer.sampling import SamplingParams

    params = params or SamplingParams(max_new_tokens=64)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done_ids: set[str] = set()
    if resume and out.is_file():
        done_ids = {row["image"] for row in iter_jsonl(out)}
    items = [(i, s) for i, s in open_inputs(inputs, image_root) if i not in done_ids]
    ids = prompt_ids(processor, [{"role": "user", "content": f"{processor.image_token}\n{prompt}"}], 1)
    counts = {"written": 0, "skipped": len(done_ids), "failed": 0}
    pending: deque[_Job] = deque()
    bar = tqdm(total=len(items), unit="img", desc="captioning", disable=not progress, file=sys.stderr)

    def finish(job: _Job, f) -> None:
        job.done.wait()
        if job.error:
            counts["failed"] += 1
            log.warning("%s: generation failed: %s", job.image_id, job.error)
        else:
            f.write(
                json.dumps({"image": job.image_id, "caption": "".join(job.parts).strip()}, ensure_ascii=False)
                + "\n"
            )
            f.flush()
            counts["written"] += 1
        bar.update(1)

    with open(out, "a" if resume else "w", encoding="utf-8") as f:
        for image_id, source in items:
            try:
                image = source.load(image_id)
            except (ImageError, OSError, KeyError, ValueError) as e:
                counts["failed"] += 1
                bar.update(1)
                log.warning("%s: cannot read the image: %s", image_id, e)
                continue
            job = _Job(image_id)
            while len(pending) >= window:
                finish(pending.popleft(), f)
            engine.submit(ids, [image], params, sink=job.sink, cache_prefix=False)
            pending.append(job)
        while pending:
            finish(pending.popleft(), f)
    bar.close()
    return counts
