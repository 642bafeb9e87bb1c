"""Start-up cost of --data on an N-row EasyR1-style Parquet file with PNG bytes: the time to
open and check it (r1vl.data.table.open_examples) with each --check_images mode, the peak RSS
of the process, and the time to make one row into an Example.

    python benchmarks/data_startup.py 100000 big.parquet lazy all
"""
import io
import resource
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from r1vl.data.synthetic import make_example
from r1vl.data.table import TableOptions, open_examples


def write(n: int, out: Path) -> None:
    """n rows cycling over 64 synthetic images (their PNG bytes in {"bytes", "path"} structs)."""
    pngs = []
    for i in range(64):
        buffer = io.BytesIO()
        make_example(0, i)[0].save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({
        "problem": ["<image>How many?"] * n, "answer": [str(i % 7) for i in range(n)],
        "images": pa.array([[{"bytes": pngs[i % 64], "path": None}] for i in range(n)], pa.list_(struct)),
    }), out)


def main() -> None:
    n, out, modes = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or ["lazy", "all"]
    if not out.exists():
        write(n, out)
    for mode in modes:
        t0 = time.perf_counter()
        table = open_examples(TableOptions(str(out), check_images=mode))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n} rows, --check_images {mode}: open + check {time.perf_counter() - t0:.1f} s, "
              f"{len(table)} records, peak RSS {peak:.0f} MiB", flush=True)
    t0 = time.perf_counter()
    table[n // 2]
    print(f"one row as an Example: {1000 * (time.perf_counter() - t0):.2f} ms")


if __name__ == "__main__":
    main()
