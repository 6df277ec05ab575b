#!/usr/bin/env python3
"""The table of an x86 rig benchmark (blk-bench.sh, net-tests.sh) from its per-round results.

Input: a file with one figure per line, tab-separated: ROUND SIDE ROW VALUE, written by the
benchmark as each boot ends. The sides ran back to back in every round, so load from elsewhere
on the machine hits them alike; each ratio is therefore taken per round, and its median and
range are printed, not the ratio of the medians.

Output: a Markdown table, one line per row (in the order the rows first appear), with
median [min–max] over the rounds for each side and for each requested ratio. A figure missing
from a round is counted, printed below the table, and makes the exit status 1.
"""
import argparse
import statistics
import sys


def read(path):
    figures, rows = {}, []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                rnd, side, row, value = line.split("\t")
                figures[(int(rnd), side, row)] = float(value)
            except ValueError:
                sys.exit(f"bench_report: {path}:{n}: not ROUND<TAB>SIDE<TAB>ROW<TAB>VALUE: {line!r}")
            if row not in rows:
                rows.append(row)
    return figures, rows


def number(value, decimals):
    return f"{value:,.{decimals}f}"


def spread(values, decimals):
    """median [min–max] of the values, or '-' when there are none."""
    if not values:
        return "-"
    values = sorted(values)
    text = number(statistics.median(values), decimals)
    if len(values) > 1:
        text += f" [{number(values[0], decimals)}–{number(values[-1], decimals)}]"
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="the ROUND SIDE ROW VALUE file")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--sides", required=True, help="comma-separated sides, in column order")
    ap.add_argument("--ratio", action="append", default=[], metavar="A/B",
                    help="a ratio column A / B, taken per round (repeatable)")
    ap.add_argument("--row-title", default="row", help="the first column's heading")
    ap.add_argument("--decimals", type=int, default=0, help="decimals of the figures (ratios have 2)")
    args = ap.parse_args()

    figures, rows = read(args.results)
    sides = args.sides.split(",")
    ratios = []
    for r in args.ratio:
        a, _, b = r.partition("/")
        if a not in sides or b not in sides:
            sys.exit(f"bench_report: ratio {r}: both sides must be among --sides")
        ratios.append((a, b))
    rounds = range(1, args.rounds + 1)

    print(f"| {args.row_title} | " + " | ".join(sides) + "".join(f" | {a} / {b}" for a, b in ratios) + " |")
    print("|---" * (1 + len(sides) + len(ratios)) + "|")
    missing = []
    for row in rows:
        cells = []
        for side in sides:
            values = [figures[(r, side, row)] for r in rounds if (r, side, row) in figures]
            missing += [f"round {r} {side}: {row}" for r in rounds if (r, side, row) not in figures]
            cells.append(spread(values, args.decimals))
        for a, b in ratios:
            per_round = [figures[(r, a, row)] / figures[(r, b, row)] for r in rounds
                         if (r, a, row) in figures and figures.get((r, b, row), 0) > 0]
            cells.append(spread(per_round, 2))
        print(f"| {row} | " + " | ".join(cells) + " |")
    print()
    print(f"{args.rounds} round(s), each running {', '.join(sides)} back to back; "
          "median [min–max] over the rounds; a ratio is the median [min–max] of the per-round ratios.")
    if missing:
        print(f"{len(missing)} figure(s) missing: " + "; ".join(missing))
        sys.exit(1)


if __name__ == "__main__":
    main()
