"""Worker for tests/test_distributed.py: train.py's main with --out-dir given per rank, as on
nodes that do not share a file system (argv: BASE SPLIT MAX_STEPS; SPLIT=1 gives rank r
BASE/node<r>)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sra_fast.trainer import main  # noqa: E402

if __name__ == "__main__":
    base, split, steps = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    out = f"{base}/node{os.environ.get('RANK', '0')}" if split else base
    sys.exit(main(["--out-dir", out, "--exp-name", "run", "--max-steps", steps,
                   "--ckpt-every", "2", "--sample-every", "0", "--log-every", "1",
                   "--batch-size", "8", "--kernels", "ref", "--resume", "auto",
                   "--device", "cpu", "--threads", "1"]))
