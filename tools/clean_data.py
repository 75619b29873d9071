"""Clean a corpus before tokenising: normalise, filter, mask PII, deduplicate (exact and MinHash).

    python tools/clean_data.py --input 'raw/*.jsonl.zst' --output clean/corpus.jsonl --workers 8

JSONL (plain, .gz, .zst) or Parquet in; JSONL (.gz / .zst by suffix) or Parquet out, which
`tools/preprocess_data.py` reads directly. The stages and their defaults are those of
`engine.data.cleaning` (docs/data.md lists them with the papers they follow); each has flags to
tune or turn it off. Beside the output it writes ``{output}.report.json`` (documents and bytes
removed per stage and reason) and ``{output}.removed/{reason}.jsonl`` (the first
``--samples-per-reason`` removed records of each reason, for inspection).

A corpus too large for one run is sharded as datatrove does: the input files are dealt to
``--shard i/n`` runs (file j to shard j % n), each writing its files' filtered documents and
their hashes to ``--work-dir``; then ``--merge`` deduplicates them in corpus order and writes
the output. The result is the single run's, byte for byte.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.cleaning.corpus import MALFORMED, Writer, read_batches  # noqa: E402
from engine.data.cleaning.filters import QualityConfig  # noqa: E402
from engine.data.cleaning.minhash import MinHashConfig  # noqa: E402
from engine.data.cleaning.normalize import NormalizeConfig  # noqa: E402
from engine.data.cleaning.pipeline import (  # noqa: E402
    CleanConfig,
    Deduplicator,
    Outcome,
    Report,
    process_records,
)
from engine.data.input_files import InputError  # noqa: E402
from engine.data.input_files import input_files as data_input_files  # noqa: E402
from engine.progress import Progress  # noqa: E402

_BATCH = 256  # records a worker task holds
_QUALITY_FIELDS = set(QualityConfig.__dataclass_fields__)
_COUNT_RULES = {"min_words", "max_words", "min_stop_words", "short_line_chars"}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    io_ = parser.add_argument_group("input and output")
    io_.add_argument("--input", nargs="+", help="JSONL (.gz/.zst) or Parquet files, or globs")
    io_.add_argument("--output", help="the cleaned corpus (.jsonl[.gz|.zst] or .parquet)")
    io_.add_argument("--text-key", default="text", help="the field holding the text")
    io_.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="processes for the per-document stages (default: all cores)")  # fmt: skip
    io_.add_argument("--samples-per-reason", type=int, default=20)
    io_.add_argument("--shard", help="i/n: this run's share of the input files")
    io_.add_argument("--work-dir", help="where --shard runs leave their files for --merge")
    io_.add_argument("--merge", action="store_true", help="deduplicate --work-dir's shards")
    norm = parser.add_argument_group("normalisation")
    norm.add_argument("--no-normalize", action="store_true", help="skip every step below")
    norm.add_argument("--unicode-form", default="NFC", choices=["NFC", "NFKC", "none"])
    for step in ("html-entities", "control-characters", "whitespace", "boilerplate-lines"):
        norm.add_argument(f"--no-{step}", action="store_true")
    quality = parser.add_argument_group("quality filters")
    quality.add_argument("--no-quality-filters", action="store_true")
    quality.add_argument("--quality", action="append", default=[], metavar="RULE=VALUE",
                         help="set a rule's limit (e.g. min_words=20, max_short_lines=none; "
                              "n-gram rules take n:limit,...)")  # fmt: skip
    quality.add_argument("--scripts", help="keep documents in these scripts (latin,cyrillic)")
    quality.add_argument("--min-script-fraction", type=float, default=0.65)
    pii = parser.add_argument_group("PII")
    pii.add_argument("--mask-pii", action="store_true", help="mask e-mail and IP addresses")
    dedup = parser.add_argument_group("deduplication")
    dedup.add_argument("--no-exact-dedup", action="store_true")
    dedup.add_argument("--no-near-dedup", action="store_true")
    defaults = MinHashConfig()
    dedup.add_argument("--minhash-ngram", type=int, default=defaults.ngram)
    dedup.add_argument("--minhash-shingles", default=defaults.shingles, choices=["word", "char"])
    dedup.add_argument("--minhash-bands", type=int, default=defaults.bands)
    dedup.add_argument("--minhash-rows", type=int, default=defaults.rows)
    dedup.add_argument("--minhash-threshold", type=float, default=defaults.threshold)
    dedup.add_argument("--minhash-agreement", type=float, default=None,
                       help="share of signature positions that must agree (default: the "
                       "threshold; lower finds more pairs near it: docs/cleaning.md)")  # fmt: skip
    dedup.add_argument("--minhash-seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    _check(parser, args)
    return args


def _quality_value(rule: str, text: str) -> Any:
    """A ``--quality`` value: none, a number, or ``n:limit,...`` for the n-gram rules."""
    if text.lower() == "none":
        return None
    if rule in ("max_top_ngram_chars", "max_duplicate_ngram_chars"):
        pairs = (item.split(":") for item in text.split(","))
        return {int(n): float(limit) for n, limit in pairs}
    if rule in ("reject_lorem_ipsum", "reject_curly_bracket"):
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    return int(text) if rule in _COUNT_RULES else float(text)


def build_config(args: argparse.Namespace) -> CleanConfig:
    """The stages the flags ask for (bad values: ValueError naming the flag)."""
    normalize = None
    if not args.no_normalize:
        normalize = NormalizeConfig(
            html_entities=not args.no_html_entities,
            unicode_form=None if args.unicode_form == "none" else args.unicode_form,
            control_characters=not args.no_control_characters,
            whitespace=not args.no_whitespace,
            boilerplate_lines=not args.no_boilerplate_lines,
        )
    quality = None
    if not args.no_quality_filters:
        quality = QualityConfig(min_script_fraction=args.min_script_fraction)
        if args.scripts:
            quality = replace(quality, scripts=tuple(args.scripts.lower().split(",")))
        for setting in args.quality:
            rule, _, value = setting.partition("=")
            if rule not in _QUALITY_FIELDS or not value:
                raise ValueError(f"--quality {setting}: expected RULE=VALUE with RULE one of "
                                 f"{', '.join(sorted(_QUALITY_FIELDS))}")  # fmt: skip
            try:
                quality = replace(quality, **{rule: _quality_value(rule, value)})
            except ValueError:
                raise ValueError(f"--quality {setting}: {value!r} is not a valid limit") from None
    minhash = None
    if not args.no_near_dedup:
        minhash = MinHashConfig(
            args.minhash_ngram, args.minhash_shingles, args.minhash_bands, args.minhash_rows,
            args.minhash_threshold, args.minhash_agreement, args.minhash_seed,
        )  # fmt: skip
    config = CleanConfig(args.text_key, normalize, quality, args.mask_pii,
                         not args.no_exact_dedup, minhash)  # fmt: skip
    errors = config.errors()
    if errors:
        raise ValueError("; ".join(errors))
    return config


def input_files(patterns: list[str]) -> list[str]:
    """Every file the patterns name, sorted within each pattern (the corpus order)."""
    return [path for pattern in patterns for path in data_input_files(pattern)]


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard {text}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in [0, n)")
    return i, n


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before any work: one line naming what is wrong."""
    try:
        args.config = build_config(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
        if args.merge:
            if args.work_dir is None or not os.path.isdir(args.work_dir):
                raise ValueError(f"--merge needs --work-dir holding the shards' files, got "
                                 f"{args.work_dir}")  # fmt: skip
        else:
            if not args.input:
                raise ValueError("--input is required (or --merge)")
            args.files = input_files(args.input)
        if args.shard is not None:
            args.shard_index, args.shard_count = _shard(args.shard)
            if args.work_dir is None:
                raise ValueError("--shard needs --work-dir (where --merge will find its files)")
            os.makedirs(args.work_dir, exist_ok=True)
        elif args.output is None:
            raise ValueError("--output is required")
        else:
            out_dir = os.path.dirname(os.path.abspath(args.output))
            os.makedirs(out_dir, exist_ok=True)
            if not os.access(out_dir, os.W_OK):
                raise ValueError(f"--output {args.output}: {out_dir} is not writable")
    except (ValueError, OSError) as error:
        parser.error(str(error))


def new_progress() -> Progress:
    """Documents, docs/s, MB/s and removed so far, on stderr (`engine.progress`)."""
    return Progress(unit="docs", label="clean")


def show(progress: Progress, report: Report, close: bool = False) -> None:
    """Advance ``progress`` to ``report``'s counts (``close``: the final line)."""
    removed = report.documents - report.kept_documents
    share = 100 * removed / max(report.documents, 1)
    counters = {"MB": report.bytes / 2**20}
    fields = {"removed": f"{removed:,} ({share:.1f}%)"}
    if close:
        progress.close(report.documents, counters=counters, fields=fields)
    else:
        progress.update(report.documents, counters=counters, fields=fields)


def _work(records: list[dict[str, Any]], config: CleanConfig) -> list[Outcome]:
    """A worker's task: malformed lines become removed documents, the rest go through."""
    malformed = [MALFORMED in r for r in records]
    outcomes = process_records([r for r, bad in zip(records, malformed, strict=True)
                                if not bad], config)  # fmt: skip
    it = iter(outcomes)
    return [Outcome(None, "input", "malformed_line", 0, record=r) if bad else next(it)
            for r, bad in zip(records, malformed, strict=True)]  # fmt: skip


def outcomes(
    files: list[str], config: CleanConfig, workers: int
) -> Iterator[tuple[int, list[Outcome]]]:
    """``(file index, outcomes of a batch)`` in corpus order. At most ``2 x workers`` batches
    are in flight, so memory does not grow with the corpus."""
    batches = ((i, batch) for i, path in enumerate(files) for batch in read_batches(path, _BATCH))
    if workers == 1:
        for i, batch in batches:
            yield i, _work(batch, config)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for i, batch in batches:
            pending.append((i, pool.apply_async(_work, (batch, config))))
            if len(pending) >= 2 * workers:
                index, result = pending.popleft()
                yield index, result.get()
        while pending:
            index, result = pending.popleft()
            yield index, result.get()


def write_report(report: Report, output: str) -> None:
    """``{output}.report.json`` and the samples beside it (their directory replaced)."""
    Path(output + ".report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    samples = Path(output + ".removed")
    samples.mkdir(exist_ok=True)
    for old in samples.glob("*.jsonl"):
        old.unlink()
    for reason, records in report.samples.items():
        with open(samples / f"{reason}.jsonl", "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _finish(writer: Writer, report: Report, output: str, progress: Progress) -> None:
    writer.close()
    show(progress, report, close=True)
    write_report(report, output)


def clean(args: argparse.Namespace) -> Report:
    """The single run: every stage, in corpus order, straight to ``--output``."""
    config: CleanConfig = args.config
    report, progress = Report(args.samples_per_reason), new_progress()
    dedup = Deduplicator(config)
    writer = Writer(args.output)
    for _, batch in outcomes(args.files, config, args.workers):
        for outcome in batch:
            dedup.decide(outcome)
            report.count(outcome)
            if outcome.stage is None:
                assert outcome.line is not None
                writer.write(outcome.line)
        show(progress, report)
    _finish(writer, report, args.output, progress)
    return report


def _file_stem(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, f"file_{index:06d}")


def shard(args: argparse.Namespace) -> Report:
    """A ``--shard i/n`` run: per input file of this shard, the documents the filters keep
    (``file_*.jsonl``), their hashes (``file_*.npz``) and the filters' report
    (``file_*.report.json``, with its samples), for ``--merge``."""
    config: CleanConfig = args.config
    mine = [i for i in range(len(args.files)) if i % args.shard_count == args.shard_index]
    files = [args.files[i] for i in mine]
    total, progress = Report(args.samples_per_reason), new_progress()
    per_file: dict[int, tuple[Report, Any, list[tuple[int, int]], list[np.ndarray]]] = {}

    def close(local: int) -> None:
        report, out, kept, signatures = per_file.pop(local)
        out.close()
        stem = _file_stem(args.work_dir, mine[local])
        np.savez(stem + ".npz", exact=np.array([h for h, _ in kept], dtype=np.uint64),
                 sizes=np.array([n for _, n in kept], dtype=np.int64),
                 signatures=np.array(signatures, dtype=np.uint32))  # fmt: skip
        data = {**report.to_dict(), "samples": report.samples, "files": len(args.files),
                "config": repr(config)}  # fmt: skip
        Path(stem + ".report.json").write_text(json.dumps(data, ensure_ascii=False))

    for local, batch in outcomes(files, config, args.workers):
        if local not in per_file:
            for done in list(per_file):
                close(done)
            out = open(_file_stem(args.work_dir, mine[local]) + ".jsonl", "w", encoding="utf-8")
            per_file[local] = (Report(args.samples_per_reason), out, [], [])
        report, out, kept, signatures = per_file[local]
        for outcome in batch:
            if outcome.stage is not None:
                report.count(outcome)
                total.count(outcome)
                continue
            assert outcome.line is not None
            out.write(outcome.line + "\n")
            kept.append((outcome.exact_hash, outcome.size_bytes))
            if outcome.signature is not None:
                signatures.append(outcome.signature)
            total.documents += 1
        show(progress, total)
    for done in list(per_file):
        close(done)
    for local in range(len(files)):  # a file with no records at all still has its entry
        stem = _file_stem(args.work_dir, mine[local])
        if not os.path.exists(stem + ".report.json"):
            per_file[local] = (Report(args.samples_per_reason),
                               open(stem + ".jsonl", "w", encoding="utf-8"), [], [])  # fmt: skip
            close(local)
    show(progress, total, close=True)
    return total


def merge(args: argparse.Namespace) -> Report:
    """``--merge``: the shards' files in corpus order through the deduplication, to
    ``--output``; the report adds the filters' counts and samples file by file."""
    config: CleanConfig = args.config
    reports = sorted(Path(args.work_dir).glob("file_*.report.json"))
    if not reports:
        raise SystemExit(f"clean_data.py: error: --work-dir {args.work_dir} holds no shard files")
    expected = json.loads(reports[0].read_text())["files"]
    if len(reports) != expected:
        raise SystemExit(f"clean_data.py: error: --work-dir {args.work_dir} holds "
                         f"{len(reports)} of the corpus's {expected} files: run every "
                         f"--shard first")  # fmt: skip
    report, progress = Report(args.samples_per_reason), new_progress()
    dedup, writer = Deduplicator(config), Writer(args.output)
    for path in reports:
        data = json.loads(path.read_text())
        if data["config"] != repr(config):
            raise SystemExit(f"clean_data.py: error: {path} was made with other settings: "
                             "give --merge the flags the shards had")  # fmt: skip
        filtered = Report.from_dict(data, args.samples_per_reason)
        filtered.samples = data["samples"]
        stem = str(path).removesuffix(".report.json")
        arrays = np.load(stem + ".npz")
        exact, sizes, signatures = arrays["exact"], arrays["sizes"], arrays["signatures"]
        # The single run interleaves this file's removed and kept documents; the counts and
        # each reason's samples come out the same either way (filters and dedup have
        # different reasons).
        report.merge(filtered)
        with open(stem + ".jsonl", encoding="utf-8") as lines:
            for k, line in enumerate(lines):
                line = line.rstrip("\n")
                outcome = Outcome(line, None, None, int(sizes[k]), exact_hash=int(exact[k]),
                                  signature=signatures[k] if len(signatures) else None)  # fmt: skip
                dedup.decide(outcome)
                report.count(outcome)
                if outcome.stage is None:
                    writer.write(line)
        show(progress, report)
    _finish(writer, report, args.output, progress)
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    try:
        return _run(args)
    except InputError as error:  # a corrupt or unreadable input, found while reading it
        print(f"clean_data.py: error: {error.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.shard is not None:
        total = shard(args)
        print(f"shard {args.shard}: {total.documents:,} documents, {total.removed_documents():,} "
              f"removed by the filters; run --merge --work-dir {args.work_dir} after every "
              "shard")  # fmt: skip
        return 0
    report = merge(args) if args.merge else clean(args)
    print(report.table())
    print(f"report: {args.output}.report.json, removed samples: {args.output}.removed/")
    if report.kept_documents == 0:
        print(f"clean_data.py: error: no document of {report.documents:,} was kept; "
              f"see {args.output}.report.json", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
