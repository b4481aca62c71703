"""Train SiT/DiT with Self-Representation Alignment (SRA).

    python train.py                       # embedded run: a small SiT on scikit-learn digits
    python train.py --data-dir DATA --model SiT-XL/2 --block-out-s 8 --block-out-t 20
    torchrun --nproc-per-node 8 train.py --data-dir DATA ...

`python train.py --help` lists every flag; the logic lives in sra_fast.trainer.
"""
import sys

from sra_fast.peer_watch import exit_if_store_requests_linger
from sra_fast.trainer import main

if __name__ == "__main__":
    status = main()
    exit_if_store_requests_linger(status)
    sys.exit(status)
