"""``sparsek-data prepare CONFIG [key=value ...]``: builds the corpus, the tokenizer and the token caches of a
run config's ``data`` section and prints statistics."""

from __future__ import annotations

import argparse
import json
import sys

from sparsek_train.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsek-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build corpus, tokenizer and token caches; print statistics")
    prepare.add_argument("config", help="run config YAML")
    prepare.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"sparsek-data: config error: {error}", file=sys.stderr)
        return 2

    from sparsek_train.config import RECALL

    if config.data.dataset == RECALL:
        print(f"sparsek-data: {RECALL!r} is generated while training; nothing to prepare")
        return 0
    import tensorflow_datasets as tfds

    from sparsek_jax.data import prepare_data, statistics

    tfds.disable_progress_bar()
    d = config.data
    try:
        prepared = prepare_data(dataset=d.dataset, data_dir=d.data_dir, source_path=d.source_path,
                                text_key=d.text_key, tokenizer_path=d.tokenizer, vocab_size=d.vocab_size)
    except ValueError as error:
        print(f"sparsek-data: {error}", file=sys.stderr)
        return 2
    report = {split: statistics(tokens) for split, tokens in prepared.splits.items()}
    report["skipped_not_utf8"] = len(prepared.skipped)
    print()
    header = f"{'split':<11}{'docs':>6}{'tokens':>12}{'bytes/tok':>10}{'median len':>11}{'max len':>9}{'>=8k':>6}{'>=32k':>7}"
    print(header)
    for split, s in report.items():
        if split == "skipped_not_utf8":
            continue
        print(f"{split:<11}{s['documents']:>6}{s['tokens']:>12,}{s.get('bytes_per_token', 0):>10.2f}"
              f"{s.get('length_median', 0):>11,}{s.get('length_max', 0):>9,}{s.get('documents_8k_or_more', 0):>6}"
              f"{s.get('documents_32k_or_more', 0):>7}")
    if prepared.skipped:
        print(f"skipped (not valid UTF-8): {len(prepared.skipped)}")
    (prepared.directory / "statistics.json").write_text(json.dumps(report, indent=2))
    print(f"\ndata ready under {prepared.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
