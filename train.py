"""
train.py -- two-stage full SFT of InternLM2-Chat-7B the InternLM-Law way (arXiv 2406.14887).

Not implemented yet (issues #4 and #5). Planned launch commands:

    torchrun --nproc_per_node 8 train.py --stage 1
    torchrun --nproc_per_node 8 train.py --stage 2
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=[1, 2], help="1: legal + general data; 2: high-quality legal only")
    parser.parse_args(argv)
    print("error: train.py is not implemented yet (see README, Status). Nothing was trained.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
