"""Cost of kvstore.fingerprint(model) on a Qwen2.5-0.5B-shaped bf16 module (~1 GB): the full hash
against the memo's sampled check (issue 15, item 2). Usage: python benchmarks/bench_fingerprint_memo.py [SAMPLES]"""

import sys
import time

import mlx.core as mx
import mlx.nn as nn

import kvstore
from kvstore.cache import fingerprint as f

f.SAMPLES_PER_PARAM = int(sys.argv[1]) if len(sys.argv) > 1 else f.SAMPLES_PER_PARAM


class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.layers = [
            {
                k: mx.zeros(shape, dtype=mx.bfloat16)
                for k, shape in dict(
                    q=(896, 896), k=(128, 896), v=(128, 896), o=(896, 896), g=(4864, 896), u=(4864, 896), d=(896, 4864)
                ).items()
            }
            for _ in range(24)
        ]
        s.emb = mx.zeros((151936, 896), dtype=mx.bfloat16)


m = M()
mx.eval(m.parameters())
t = time.perf_counter()
a = kvstore.fingerprint(m)
t1 = time.perf_counter()
ts = []
for _ in range(5):
    t1 = time.perf_counter()
    kvstore.fingerprint(m)
    ts.append(time.perf_counter() - t1)
p = f._params(m)
t3 = time.perf_counter()
f._sample_signature(p)
t4 = time.perf_counter()
t5 = time.perf_counter()
f._params(m)
t6 = time.perf_counter()
print(
    f.SAMPLES_PER_PARAM,
    "samples/param:",
    "full ms",
    round((t1 - t) * 1e3, 1),
    "memo hit ms min",
    round(min(ts) * 1e3, 1),
    "sig",
    round((t4 - t3) * 1e3, 1),
    "params",
    round((t6 - t5) * 1e3, 1),
)
