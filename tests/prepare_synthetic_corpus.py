"""An English-like synthetic corpus for the preparation benchmarks: documents made of a random half
of a standard-library document's paragraphs (data.stdlib_corpus()), in random order, until the
file has MEGABYTES x 1e6 characters.

    python tests/prepare_synthetic_corpus.py /tmp/c20.txt 20
"""

import sys

import numpy as np

from funnel_jax import data


def main() -> None:
    docs = [d.split("\n") for d in data.stdlib_corpus()]
    target = int(float(sys.argv[2]) * 1e6)
    rng = np.random.default_rng(0)
    n = 0
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        while n < target:
            d = docs[rng.integers(len(docs))]
            paras = [d[i] for i in rng.permutation(len(d))[: max(1, len(d) // 2)]]
            text = "\n".join(paras) + "\n\n"
            f.write(text)
            n += len(text)


if __name__ == "__main__":
    main()
