"""
prepare_data.py -- build the stage-1 and stage-2 SFT datasets (ingest, filter, deduplicate,
decontaminate against LawBench, mix, tokenize with the chat template).

Not implemented yet (issue #3). Planned command:

    python prepare_data.py --recipe recipe.json --tokenizer PATH --out data/processed
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="JSON recipe listing the data sources and their stages")
    parser.add_argument("--tokenizer", help="tokenizer path (from_pretrained)")
    parser.add_argument("--out", default="data/processed", help="output folder")
    parser.parse_args(argv)
    print("error: prepare_data.py is not implemented yet (see README, Status). No data was written.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
