"""bench_memory's peak finder: the most bytes held at once, and the blocks held then."""
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# in a process of its own: importing bench_memory turns fused kernels on for the process
_PEAK = """
import json, torch, bench_memory

def fn():
    first = torch.empty(1_000_000, dtype=torch.uint8)
    with torch.profiler.record_function("second"):
        second = torch.empty(3_000_000, dtype=torch.uint8)
    del first
    with torch.profiler.record_function("third"):
        third = torch.empty(2_000_000, dtype=torch.uint8)
    del second, third

peak = bench_memory.transient_peak(fn)
print(json.dumps({"bytes": peak.bytes, "under_way": peak.under_way,
                  "blocks": [[size, names[:2]] for size, names in peak.blocks]}))
"""


def test_the_peak_is_the_most_held_at_once_and_its_blocks_are_named_where_allocated():
    out = subprocess.run([sys.executable, "-c", _PEAK], cwd=BENCHMARKS, capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    # 1 + 3 MB held first, then 3 + 2 MB once the first is freed: the peak is the second pair
    assert peak["bytes"] == 5_000_000
    assert peak["under_way"][:2] == ["aten::empty", "third"]  # innermost first
    assert peak["blocks"] == [[3_000_000, ["aten::empty", "second"]], [2_000_000, ["aten::empty", "third"]]]
