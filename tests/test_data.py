import numpy as np
import pytest

from sleepbot.config import DataConfig
from sleepbot.data import make_datamodule
from sleepbot.errors import SleepbotError


def test_digits_split_is_fixed_and_disjoint():
    a = make_datamodule(DataConfig(), seed=0)
    b = make_datamodule(DataConfig(), seed=5)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    sizes = {k: len(v[1]) for k, v in a.tensors.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 270
    for split in ("train", "val", "test"):  # the split does not depend on the run seed
        assert np.array_equal(a.tensors[split][0].numpy(), b.tensors[split][0].numpy())
    c = make_datamodule(DataConfig(split_seed=1), seed=0)
    assert not np.array_equal(a.tensors["val"][0].numpy(), c.tensors["val"][0].numpy())
    # no example of val appears in train (rows compared exactly)
    train = {r.tobytes() for r in a.tensors["train"][0].numpy()}
    dup_val = sum(r.tobytes() in train for r in a.tensors["val"][0].numpy())
    assert dup_val < 5  # digits holds a handful of exact duplicate images; a leak would be ~270


def test_batch_order_follows_run_seed():
    first = [next(iter(make_datamodule(DataConfig(), seed=s).train_dataloader()))[1] for s in (0, 0, 1)]
    assert first[0].tolist() == first[1].tolist() != first[2].tolist()


def test_mnist1d_generated_offline_and_cached(tmp_path):
    cfg = DataConfig(name="mnist1d", data_dir=str(tmp_path))
    dm = make_datamodule(cfg)
    assert dm.input_shape == (1, 40) and dm.num_classes == 10
    assert (tmp_path / "mnist1d.npz").is_file()
    again = make_datamodule(cfg)
    assert np.array_equal(dm.tensors["test"][0].numpy(), again.tensors["test"][0].numpy())


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_datasets_fail_with_a_clear_error(name, tmp_path):
    # torchvision is not usable beside the CPU torch on these machines; where it is, there is no network here.
    with pytest.raises(SleepbotError, match=f"dataset '{name}'") as err:
        make_datamodule(DataConfig(name=name, data_dir=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_unknown_dataset():
    with pytest.raises(SleepbotError, match="unknown dataset 'svhn'"):
        make_datamodule(DataConfig(name="svhn"))
