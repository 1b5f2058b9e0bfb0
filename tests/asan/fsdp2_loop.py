"""Loops a distributed scenario of tests/test_distributed.py (default: FSDP2 with the full-peephole
variants), to chase a rare crash (a past CI run aborted there with `malloc(): unaligned tcache
chunk detected`). Each iteration is a fresh pair of workers, with faulthandler and glibc's malloc
checks (or ASan, under tests/asan/run_asan.sh); the first failure is printed and ends the loop.

    tests/asan/run_asan.sh .venv/bin/python tests/asan/fsdp2_loop.py --iterations 20   # ASan
    PYTHONPATH=. .venv/bin/python tests/asan/fsdp2_loop.py --minutes 10                 # glibc

Prints which lstm_fused it loaded and how many iterations passed; exit status 1 on a failure.
"""

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_distributed, conftest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="fsdp2")
    parser.add_argument("--variants", default="full-standard,full-coupled",
                        help="conftest.variant_id names, comma-separated")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    args = parser.parse_args()
    os.environ["LSTM_FUSED_TEST_DIST_VARIANTS"] = args.variants

    import test_distributed

    import lstm_fused

    print(f"looping {args.scenario} ({args.variants}) with {lstm_fused.ops._C.__file__}",
          flush=True)
    start, passed = time.monotonic(), 0
    for i in range(args.iterations):
        if args.minutes is not None and time.monotonic() - start > 60 * args.minutes:
            break
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            report = test_distributed.run_workers([args.scenario], Path(tmp),
                                                  test_distributed.TIMEOUT)[args.scenario]
        if report is not None:
            print(f"iteration {i + 1} FAILED:\n{report}", flush=True)
            sys.exit(1)
        passed += 1
        print(f"iteration {i + 1}: ok ({time.monotonic() - start:.0f}s)", flush=True)
    print(f"{passed} iterations passed in {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
