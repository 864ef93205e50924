#!/usr/bin/env python3
"""Where the instructions of benches/callgrind.sh's call window went, per call: the
functions with the most instructions of their own (self) and with their callees
(inclusive), from the window's callgrind dumps (`PROFILE=n bash benches/callgrind.sh`).

Written here because `callgrind_annotate` put the whole cost of these dumps (taken after
`callgrind_control -z`) under `__libc_start_main`; this reads the cost lines directly:
a function's self cost is the sum of its cost lines, its inclusive cost adds the cost
lines that follow a `calls=` line (its callees'). A recursive function's inclusive cost
counts the recursion more than once.

Usage: cgprofile.py CALLS TOP DUMP...   (CALLS: completed calls, to divide by)
"""
import collections
import sys


def read(path, self_cost, incl_cost):
    names = {}  # "(n)" -> name, for dumps with compressed names

    def name(text):
        text = text.strip()
        if text.startswith("("):
            end = text.index(")")
            key, rest = text[: end + 1], text[end + 1 :].strip()
            if rest:
                names[key] = rest
            return names.get(key, key)
        return text

    fn, after_calls = None, False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                fn = name(line[3:])
            elif line.startswith(("cfn=", "cfi=", "cfl=")):
                if line.startswith("cfn="):
                    name(line[4:])
            elif line.startswith("calls="):
                after_calls = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) < 2 or fn is None:
                    continue
                cost = int(parts[1])
                incl_cost[fn] += cost
                if after_calls:
                    after_calls = False
                else:
                    self_cost[fn] += cost


def main():
    calls, top, dumps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    self_cost, incl_cost = collections.Counter(), collections.Counter()
    for d in dumps:
        read(d, self_cost, incl_cost)
    total = sum(self_cost.values())
    calls = max(calls, 1)
    print(f"instructions in the window: {total:,} ({total // calls:,} per call, idle included)")
    # The frames that hold everything (main, the runtime's loop) say nothing: left out.
    inner = collections.Counter({f: c for f, c in incl_cost.items() if c < 0.9 * total})
    for title, table in (("self", self_cost), ("inclusive (under 90%)", inner)):
        print(f"\n{title}: per call, share of the window")
        for f, c in table.most_common(top):
            print(f"{c // calls:>10,} {100 * c / max(total, 1):5.1f}%  {f[:150]}")


if __name__ == "__main__":
    main()
