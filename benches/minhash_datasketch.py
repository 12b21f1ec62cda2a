"""datasketch baseline for benches/minhash.rs: word 3-shingles (lowercased, whitespace
split), MinHash with 128 permutations built by MinHash.bulk, MinHashLSH at the given
threshold; each document queries the index of the documents kept so far and is removed when
it finds one (keep-first, like ifloom's minhash stage). Prints JSON: seconds (shingling,
hashing and LSH; reading the file excluded), removed, version.

Usage: python3 benches/minhash_datasketch.py TEXTS.txt THRESHOLD
"""
import json
import sys
import time

import datasketch
from datasketch import MinHash, MinHashLSH

path, threshold = sys.argv[1], float(sys.argv[2])
with open(path, encoding="utf-8") as f:
    texts = f.read().split("\n")

start = time.perf_counter()
sets = []
for t in texts:
    w = t.lower().split()
    sh = [" ".join(w[i:i + 3]) for i in range(len(w) - 2)] or [" ".join(w)]
    sets.append([s.encode("utf-8") for s in sh])
hashes = MinHash.bulk(sets, num_perm=128)
lsh = MinHashLSH(threshold=threshold, num_perm=128)
removed = 0
for i, m in enumerate(hashes):
    if lsh.query(m):
        removed += 1
    else:
        lsh.insert(str(i), m)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "removed": removed, "version": datasketch.__version__}))
