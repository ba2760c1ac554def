"""Per-image outcomes, streamed in shards: what every evaluation summary is computed from.

An evaluation (the audit, AutoAttack, a robustness curve) decides, image by image, a few
yes/no facts — right when clean, still right after each attack, gradient exactly zero — one
*column* each. Every number it reports is a share of a column or of an AND of columns, so:

* the images stream batch by batch from any dataset (nothing but the bits is kept: memory is
  flat in the number of images);
* a *shard* — the outcomes of one batch of consecutive images — is written atomically into the
  run directory as soon as it is done; a killed run resumes at the first missing shard;
* under torchrun, rank ``r`` of ``N`` takes shards ``r, r + N, …``; the attacks are seeded per
  batch, so a shard's outcome depends on its own images only and the ranks together give the
  outcome of one process, image by image;
* runs of one manifest (model hash, data, attacks, seed, shard size) merge image by image
  (:func:`read_run`), whatever slices of the data each covered.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from advguard import distributed
from advguard.data.loading import ImageDataset, batches
from advguard.errors import InputError
from advguard.evaluation.autoattack import masking_warnings
from advguard.io import read_json, write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SHARDS = "shards"
Columns = dict[str, torch.Tensor]  # name -> (N,) bool, per image


@dataclass
class Outcomes:
    rows: torch.Tensor  # (N,) int64: each image's index in the split
    columns: Columns

    def __len__(self) -> int:
        return len(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows.tolist(),
                "columns": {k: "".join("1" if b else "0" for b in v.tolist())
                            for k, v in self.columns.items()}}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> Outcomes:
        rows = torch.as_tensor(obj["rows"], dtype=torch.long)
        columns = {k: torch.tensor([c == "1" for c in v], dtype=torch.bool)
                   for k, v in obj["columns"].items()}
        if any(len(v) != len(rows) for v in columns.values()):
            raise InputError("a shard's columns and rows differ in length")
        return Outcomes(rows, columns)

    @staticmethod
    def cat(parts: Sequence[Outcomes]) -> Outcomes:
        """The union of ``parts``, in row order; a row in two parts must have one outcome."""
        if not parts:
            raise InputError("no outcomes to merge")
        names = set(parts[0].columns)
        if any(set(p.columns) != names for p in parts):
            raise InputError("the outcomes to merge measured different columns: "
                             f"{sorted({tuple(sorted(p.columns)) for p in parts})}")
        rows = torch.cat([p.rows for p in parts])
        columns = {k: torch.cat([p.columns[k] for p in parts]) for k in parts[0].columns}
        order = torch.argsort(rows, stable=True)
        rows, columns = rows[order], {k: v[order] for k, v in columns.items()}
        repeated = torch.nonzero(rows[1:] == rows[:-1]).flatten()
        for i in repeated.tolist():
            if any(bool(v[i] != v[i + 1]) for v in columns.values()):
                raise InputError(f"image {int(rows[i])} has two different outcomes in the "
                                 "runs merged")
        keep = torch.ones(len(rows), dtype=torch.bool)
        keep[repeated + 1] = False
        return Outcomes(rows[keep], {k: v[keep] for k, v in columns.items()})


ShardFn = Callable[[torch.Tensor, torch.Tensor], Columns]


def _shard_name(a: int, b: int) -> str:
    return f"{a:09d}-{b:09d}.json"


def check_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` into a new run directory, or refuse one made for another run (a
    changed model file, other data, other attacks): its shards would not be this run's."""
    path = directory / MANIFEST
    if path.is_file():
        have = read_json(path)
        differ = sorted(k for k in {*have, *manifest} if have.get(k) != manifest.get(k))
        if differ:
            raise InputError(
                f"{directory} holds a run of another {', '.join(differ)} "
                f"({'; '.join(f'{k}: {json.dumps(have.get(k))[:120]}' for k in differ)}): "
                "give a new directory, or delete it to start again")
    elif distributed.is_main():
        write_json(path, dict(manifest))
    distributed.barrier()


def run_shards(fn: ShardFn, data: ImageDataset, *, shard_size: int, first_row: int = 0,
               directory: Path | None = None, manifest: Mapping[str, Any] | None = None,
               workers: int = 0, progress: bool = False, desc: str = "images",
               running: Callable[[Outcomes], str] | None = None,
               extra: Mapping[str, Any] | None = None) -> Outcomes:
    """``fn(x, y)`` on every batch of ``shard_size`` consecutive images of ``data`` (its
    per-image :data:`Columns`); the outcomes of all of them (image ``i`` of ``data`` is row
    ``first_row + i``). With ``directory``, each batch's outcome is written there as it
    finishes and batches already there are not run again (``manifest`` must match the one
    there); under torchrun the ranks share the batches and every rank returns the whole.
    ``running`` is shown each piece's outcomes once, those found done included, and gives the
    progress bar's text (a running accuracy, kept by the callable);
    ``extra`` is written into each shard (the device, versions)."""
    if shard_size < 1:
        raise InputError(f"the shard size must be at least 1, got {shard_size}")
    n = len(data)
    spans = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        check_manifest(directory, manifest or {})
    done: dict[int, Outcomes] = {}
    if directory is not None:
        for k, (a, b) in enumerate(spans):
            path = directory / SHARDS / _shard_name(first_row + a, first_row + b)
            if path.is_file():
                done[k] = Outcomes.from_json(read_json(path))
    mine = [k for k in range(len(spans))
            if k % distributed.world_size() == distributed.rank() and k not in done]
    if done:
        log.info("resuming: %d of %d batches done already", len(done), len(spans))
    if running is not None:
        for part in done.values():
            running(part)  # the pieces found done count in the running text
    total = sum(spans[k][1] - spans[k][0] for k in mine)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    rows = [torch.arange(*spans[k]) for k in mine]
    for k, (x, y, _) in zip(mine, batches(data, rows, batch_size=shard_size, workers=workers),
                            strict=True):
        a, b = spans[k]
        part = Outcomes(torch.arange(first_row + a, first_row + b), fn(x, y))
        if directory is not None:
            write_json(directory / SHARDS / _shard_name(first_row + a, first_row + b),
                       {**part.to_json(), **(extra or {})})
        done[k] = part
        if running is not None:
            bar.set_postfix_str(running(part), refresh=False)
        bar.update(b - a)
    bar.close()
    return _gather(done, len(spans), directory, first_row, spans)


def _gather(done: dict[int, Outcomes], count: int, directory: Path | None, first_row: int,
            spans: list[tuple[int, int]]) -> Outcomes:
    if distributed.active():
        if directory is not None:
            distributed.barrier()  # every rank's shards are on disk
            for k, (a, b) in enumerate(spans):
                if k not in done:
                    done[k] = Outcomes.from_json(read_json(
                        directory / SHARDS / _shard_name(first_row + a, first_row + b)))
        else:
            merged: dict[int, Outcomes] = {}
            for part in distributed.gather_all(done):
                merged.update(part)
            done = merged
    if len(done) != count:
        raise InputError(f"{count - len(done)} of {count} batches have no outcome")
    return Outcomes.cat([done[k] for k in range(count)])


def read_run(directories: Sequence[Path]) -> tuple[dict[str, Any], Outcomes]:
    """The manifest and the merged outcomes of finished or partial runs of one manifest (the
    data slice aside): shards of several directories (other slices, other machines) merge
    image by image."""
    if not directories:
        raise InputError("give at least one run directory")
    manifests = []
    for d in directories:
        if not (d / MANIFEST).is_file():
            raise InputError(f"{d} is not a run directory (no {MANIFEST})")
        manifests.append(read_json(d / MANIFEST))
    first = {k: v for k, v in manifests[0].items() if k != "data_slice"}
    for d, m in zip(directories, manifests, strict=True):
        differ = sorted(k for k in {*first, *m} - {"data_slice"} if first.get(k) != m.get(k))
        if differ:
            raise InputError(f"{d} is a run of another {', '.join(differ)} than "
                             f"{directories[0]}: its outcomes do not merge")
    parts = [Outcomes.from_json(read_json(p)) for d in directories
             for p in sorted((d / SHARDS).glob("*.json"))]
    return first, Outcomes.cat(parts)


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """AutoAttack results (:meth:`AutoAttackResult.to_json`) of disjoint slices of one set →
    the result over their union: every accuracy weighted by its slice's images, plus the
    ``standard_error`` of the robust accuracy. AutoAttack attacks each image on its own, so
    slices run apart (``audit --test-start``) add up to one run; they must share ε, budgets
    and implementation."""
    if not parts:
        raise InputError("no AutoAttack results to merge")
    for key in ("eps", "standard", "implementation"):
        if len({str(p[key]) for p in parts}) > 1:
            raise InputError(f"AutoAttack slices differ in {key}: "
                             f"{sorted({str(p[key]) for p in parts})}")
    n = sum(int(p["images"]) for p in parts)
    if n == 0:
        raise InputError("the AutoAttack slices hold no images")

    def mean(values: Sequence[float]) -> float:
        return sum(v * p["images"] for v, p in zip(values, parts, strict=True)) / n

    merged = {**parts[0], "images": n,
              "robust_after": {k: mean([p["robust_after"][k] for p in parts])
                               for k in parts[0]["robust_after"]}}
    for key in ("clean_accuracy", "robust_accuracy", "gradient_accuracy", "square_only",
                "square_alone_accuracy"):
        values = [p.get(key) for p in parts]
        merged[key] = mean([float(v) for v in values if v is not None]) \
            if None not in values else None
    merged["warnings"] = masking_warnings(merged["square_alone_accuracy"],
                                           merged["gradient_accuracy"], merged["square_only"])
    r = merged["robust_accuracy"]
    return {**merged, "standard_error": (r * (1 - r) / n) ** 0.5}
