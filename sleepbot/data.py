"""LightningDataModules by name: `digits` (embedded default), `mnist1d` (generated offline) and torchvision ones.

Splits. Every dataset is split into train / val / test by a fixed permutation drawn from
`numpy.random.default_rng(split_seed)` (DataConfig.split_seed, default 0): the same split for every run seed, so the
validation curves of different seeds and of different sleep strategies are measured on the same examples. Datasets
that ship their own test set (mnist1d, torchvision) keep it as the test split and carve validation from train.
The order of training batches is drawn from the run seed.

Inputs are standardised with the training split's mean and std (one scalar per channel).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from sleepbot.config import DataConfig
from sleepbot.errors import SleepbotError, unknown_name

Arrays = tuple[np.ndarray, np.ndarray]
Loader = Callable[[DataConfig], tuple[Arrays, "Arrays | None"]]

# name -> loader returning ((x, y) train+val pool, (x, y) test or None). Add a dataset with a loader function and
# `@register_dataset("name")`; that line is all YAML and the CLI need (sleepbot.registry reads it).
LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return deco


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def load_digits_arrays(cfg: DataConfig) -> tuple[Arrays, Arrays | None]:
    """scikit-learn's 8x8 digits (1,797 images, shipped inside scikit-learn): x [N, 1, 8, 8] in [0, 16]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]
    return (x, bunch.target.astype(np.int64)), None


def load_mnist1d_arrays(cfg: DataConfig) -> tuple[Arrays, Arrays | None]:
    """MNIST-1D generated offline with `mnist1d.data.make_dataset` and cached as .npz in the data directory.

    `mnist1d.data.get_dataset` is avoided on purpose: it tries the network first and writes a pickle into the
    current directory.
    """
    cache = Path(cfg.data_dir) / "mnist1d.npz"
    if cache.is_file():
        with np.load(cache) as z:
            train = (z["x"], z["y"])
            test = (z["x_test"], z["y_test"])
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
        train = (d["x"].astype(np.float32)[:, None], d["y"].astype(np.int64))
        test = (d["x_test"].astype(np.float32)[:, None], d["y_test"].astype(np.int64))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, x=train[0], y=train[1], x_test=test[0], y_test=test[1])
        tmp.replace(cache)
    return train, test


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def load_torchvision_arrays(cfg: DataConfig) -> tuple[Arrays, Arrays | None]:
    """MNIST, Fashion-MNIST and CIFAR-10 through torchvision (the `vision` extra), cached in the data directory."""
    try:
        import torchvision  # noqa: F401
        from torchvision import datasets
    except (
        Exception
    ) as e:  # ImportError, or a torchvision built for another torch (operator ... does not exist)
        raise SleepbotError(
            f"dataset {cfg.name!r} needs torchvision ({type(e).__name__}); install a torchvision that matches "
            f"your torch (pip install 'sleepbot[vision]') or use 'digits' or 'mnist1d'"
        ) from None
    cls = getattr(datasets, _TORCHVISION[cfg.name])
    root = Path(cfg.data_dir)
    try:
        tr = cls(str(root), train=True, download=True)
        te = cls(str(root), train=False, download=True)
    except Exception as e:
        raise SleepbotError(
            f"dataset {cfg.name!r} is not in {str(root)!r} and could not be downloaded ({type(e).__name__}); "
            f"download it on a machine that is online into that directory, or use 'digits' or 'mnist1d'"
        ) from None

    def arrays(ds) -> Arrays:
        x = np.asarray(ds.data, dtype=np.float32)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # [N, C, H, W]
        return x, np.asarray(ds.targets, dtype=np.int64)

    return arrays(tr), arrays(te)


register_dataset("digits")(load_digits_arrays)
register_dataset("mnist1d")(load_mnist1d_arrays)
register_dataset("mnist")(load_torchvision_arrays)
register_dataset("fashion-mnist")(load_torchvision_arrays)
register_dataset("cifar10")(load_torchvision_arrays)


class ArrayDataModule(pl.LightningDataModule):
    """A dataset held in memory as tensors, split deterministically (see the module docstring).

    Attributes available after `setup()` (and already after construction, since the data is small):
    `input_shape` (channels, *spatial), `num_classes`, and the split tensors.
    """

    def __init__(self, cfg: DataConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg or DataConfig()
        if self.cfg.name not in LOADERS:
            raise unknown_name("dataset", self.cfg.name, LOADERS)
        self.seed = seed
        self._prepare()

    def _prepare(self) -> None:
        cfg = self.cfg
        (x, y), test = LOADERS[cfg.name](cfg)
        if test is None:
            tr, va, te = _split_indices(len(x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
            splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
        else:
            tr, va, _ = _split_indices(len(x), cfg.val_fraction, 0.0, cfg.split_seed)
            splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": test}
        if cfg.train_subset is not None:
            splits["train"] = tuple(a[: cfg.train_subset] for a in splits["train"])
        xt = splits["train"][0]
        axes = (0, *range(2, xt.ndim))
        mean = xt.mean(axis=axes, keepdims=True)[0]
        std = xt.std(axis=axes, keepdims=True)[0] + 1e-6
        self.tensors = {
            k: (torch.from_numpy((a - mean) / std).float(), torch.from_numpy(b))
            for k, (a, b) in splits.items()
        }
        self.input_shape = tuple(xt.shape[1:])
        self.num_classes = int(max(int(y.max()) for _, y in splits.values()) + 1)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        x, y = self.tensors[split]
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        bs = self.cfg.batch_size if split == "train" else max(self.cfg.batch_size, 512)
        return DataLoader(
            TensorDataset(x, y),
            batch_size=bs,
            shuffle=shuffle,
            drop_last=shuffle and len(x) >= bs,
            generator=gen,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def make_datamodule(cfg: DataConfig | None = None, seed: int = 0) -> ArrayDataModule:
    """The data module for `cfg.name`; unknown names raise a one-line SleepbotError."""
    return ArrayDataModule(cfg, seed=seed)
