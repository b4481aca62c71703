"""Generate samples from a checkpoint (ADM .npz + settings JSON); see sra_fast/sample.py.

    python sample.py --ckpt runs/digits/checkpoints/0001200.pt --num-samples 1000 --sampler heun
    torchrun --nproc-per-node 8 sample.py --ckpt CKPT --num-samples 50000 --cfg-scale 1.8 --guidance-high 0.7
"""
import sys

from sra_fast.sample import main

if __name__ == "__main__":
    sys.exit(main())
