"""Counts, patients and duplicates of a prepared data set, read back from its ArrayRecords."""

from __future__ import annotations

import collections
import os

import tensorflow_datasets as tfds

from pneumojax.data import builder, sources


def dataset_stats(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """Per split: class counts and patients. Across splits: shared patients and duplicates.

    Reads what was written, not the prepare report, so it also checks the files themselves.
    """
    report = builder.load_report(data_dir, name)
    skip = {"image": tfds.decode.SkipDecoding(), "lesion_mask": tfds.decode.SkipDecoding()}
    splits, patients, hashes = {}, collections.defaultdict(set), collections.defaultdict(list)
    for split in report["splits"]:
        src = builder.read_split(data_dir, name, split, skip)
        counts = dict.fromkeys(sources.CLASSES, 0)
        split_patients = set()
        for i in range(len(src)):
            ex = src[i]
            counts[sources.CLASSES[ex["label"]]] += 1
            split_patients.add(_text(ex["patient_id"]))
            hashes[_text(ex["content_hash"])].append((split, _text(ex["file_name"])))
        for p in split_patients:
            patients[p].add(split)
        splits[split] = dict(counts, total=sum(counts.values()), patients=len(split_patients))
    duplicates = [files for files in hashes.values() if len(files) > 1]
    return dict(
        name=name, settings=report["settings"], splits=splits,
        shared_patients={p: sorted(s) for p, s in patients.items() if len(s) > 1},
        duplicate_groups=duplicates,
        cross_split_duplicates=[d for d in duplicates if len({s for s, _ in d}) > 1])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def split_table(splits: dict[str, dict]) -> list[str]:
    """Rows of class counts per split, with a patients column when the counts carry one."""
    with_patients = all("patients" in c for c in splits.values())
    rows = [f"  {'split':<12}{'NORMAL':>8}{'PNEUMONIA':>11}{'total':>8}"
            + (f"{'patients':>10}" if with_patients else "")]
    for split, c in splits.items():
        rows.append(f"  {split:<12}{c['NORMAL']:>8}{c['PNEUMONIA']:>11}"
                    f"{c['NORMAL'] + c['PNEUMONIA']:>8}"
                    + (f"{c['patients']:>10}" if with_patients else ""))
    return rows


def format_stats(stats: dict) -> str:
    rows = [f"{stats['name']}  (source: {sources.display_name(stats['settings']['source'])})",
            *split_table(stats["splits"])]
    dup_files = sum(len(d) - 1 for d in stats["duplicate_groups"])
    rows.append(f"  duplicate images (same content hash): {len(stats['duplicate_groups'])} groups, "
                f"{dup_files} redundant copies; across splits: "
                f"{len(stats['cross_split_duplicates'])} groups")
    for group in stats["cross_split_duplicates"][:10]:
        rows.append("    " + " = ".join(f"{s}:{f}" for s, f in group))
    shared = stats["shared_patients"]
    rows.append(f"  patients in more than one split: {len(shared)}")
    for p, s in list(shared.items())[:10]:
        rows.append(f"    {p}: {', '.join(s)}")
    return "\n".join(rows)
