#!/usr/bin/env python3
"""Writes examples/data/first_token.csv: the long-range memory task of the
vanishing-gradient demonstration (docs/vanishing_gradients.md).

Each row is a sequence of 50 tokens, then its label: the first token is
-1 or +1, the other 49 are noise uniform in [-3, 3] (two decimals), and the
label is 1 when the first token is +1, else 0. A model must carry the
first token across 49 steps of noise. Deterministic: the same file every
run (Python's `random` with a fixed seed).
"""

import os
import random

ROWS = 2000
LENGTH = 50
NOISE = 3.0


def main():
    rng = random.Random(20261204)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "examples", "data", "first_token.csv")
    with open(path, "w") as out:
        out.write(",".join([f"t{i}" for i in range(LENGTH)] + ["label"]) + "\n")
        for _ in range(ROWS):
            label = rng.randrange(2)
            tokens = [1.0 if label else -1.0]
            tokens += [round(rng.uniform(-NOISE, NOISE), 2) for _ in range(LENGTH - 1)]
            out.write(",".join(f"{t:g}" for t in tokens) + f",{label}\n")


if __name__ == "__main__":
    main()
