"""Training data: crops, the patient split, the epoch sampler and the volume/report dataset."""

from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.errors import ApplianceError
from appliance.evaluate.zero_shot import PROMPT_PAIRS
from appliance.models import build_site_tokenizer
from appliance.train.data import EpochSampler, TrainingItem, VolumeReportDataset, crop_or_pad, split_by_patient

# ---------------------------------------------------------------- crop_or_pad


def test_centre_crop():
    v = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    out = crop_or_pad(v, (2, 4, 4), None)
    # centre starts: (4-2)//2 = 1, (6-4)//2 = 1, (8-4)//2 = 2
    assert out.shape == (2, 4, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out, v[1:3, 1:5, 2:6])
    assert out[0, 0, 0] == 1 * 48 + 1 * 8 + 2


def test_centre_crop_of_odd_excess_rounds_down():
    v = np.arange(5, dtype=np.float32).reshape(1, 1, 5)
    np.testing.assert_array_equal(crop_or_pad(v, (1, 1, 2), None), [[[1, 2]]])  # start (5-2)//2 = 1


def test_explicit_start():
    v = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    out = crop_or_pad(v, (2, 4, 4), (2, 0, 4))
    np.testing.assert_array_equal(out, v[2:4, 0:4, 4:8])


def test_short_axes_are_padded_with_air_around_the_volume():
    v = np.arange(6, dtype=np.float16).reshape(1, 2, 3)  # [[[0, 1, 2], [3, 4, 5]]]
    # Y 2 -> 4 is padded (offset (4-2)//2 = 1), X 3 -> 2 is centre-cropped (start 0)
    expected = [[[-1, -1], [0, 1], [3, 4], [-1, -1]]]
    out = crop_or_pad(v, (1, 4, 2), None)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    # an explicit start moves the crop on X; on the padded Y axis it is ignored
    np.testing.assert_array_equal(crop_or_pad(v, (1, 4, 2), (0, 1, 1)), [[[-1, -1], [1, 2], [4, 5], [-1, -1]]])


def test_pad_on_every_axis():
    v = np.ones((1, 1, 1), dtype=np.float32) * 7
    out = crop_or_pad(v, (3, 2, 4), None)
    expected = np.full((3, 2, 4), -1.0, dtype=np.float32)
    expected[1, 0, 1] = 7  # offsets (3-1)//2 = 1, (2-1)//2 = 0, (4-1)//2 = 1
    np.testing.assert_array_equal(out, expected)


def test_same_size_is_a_copy():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = crop_or_pad(v, (2, 3, 4), None)
    np.testing.assert_array_equal(out, v)
    out[0, 0, 0] = 99
    assert v[0, 0, 0] == 0


# ---------------------------------------------------------------- split_by_patient


def _items(n_patients, series_per_patient=2, prefix="p"):
    return [TrainingItem(f"{prefix}{i}-s{j}", f"{prefix}{i}-st", f"{prefix}{i}", Path(f"/nowhere/{prefix}{i}-{j}.npy"),
                         (0,), "report")
            for i in range(n_patients) for j in range(series_per_patient)]


def _patients(split):
    return {name: {it.patient_key for it in items} for name, items in split.items()}


def test_split_keeps_each_patient_in_one_split_and_every_item_once():
    items = _items(40)
    split = split_by_patient(items, seed=0, val_fraction=0.2, test_fraction=0.1)
    pats = _patients(split)
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert sorted(it.series_key for s in split.values() for it in s) == sorted(it.series_key for it in items)
    # 40 patients: round(4.0) test, round(8.0) val, the remaining 28 train; both series of a patient go together
    assert (len(pats["test"]), len(pats["val"]), len(pats["train"])) == (4, 8, 28)
    assert (len(split["test"]), len(split["val"]), len(split["train"])) == (8, 16, 56)


def test_split_fractions_are_roughly_honoured():
    split = split_by_patient(_items(101, 1), seed=3, val_fraction=0.15, test_fraction=0.05)
    assert (len(split["test"]), len(split["val"]), len(split["train"])) == (5, 15, 81)
    no_holdout = split_by_patient(_items(7, 1), seed=3, val_fraction=0.0, test_fraction=0.0)
    assert (len(no_holdout["test"]), len(no_holdout["val"]), len(no_holdout["train"])) == (0, 0, 7)


def test_split_is_reproducible_and_seeded():
    items = _items(30)
    a = split_by_patient(items, seed=11, val_fraction=0.2, test_fraction=0.2)
    b = split_by_patient(list(reversed(items)), seed=11, val_fraction=0.2, test_fraction=0.2)
    assert _patients(a) == _patients(b)  # depends on the keys and the seed, not on the order of the items
    c = split_by_patient(items, seed=12, val_fraction=0.2, test_fraction=0.2)
    assert _patients(a) != _patients(c)


def test_split_is_stable_when_a_patient_joins_the_training_tail():
    """The docstring's promise: a patient's split depends on its key, the seed and its rank. A newcomer that ranks
    among training patients (the tail of the order), with the same test/val counts, moves nobody."""
    items = _items(40)
    before = split_by_patient(items, seed=5, val_fraction=0.2, test_fraction=0.1)
    before_of = {p: name for name, ps in _patients(before).items() for p in ps}
    checked = 0
    for k in range(30):
        new = _items(1, prefix=f"new{k}-")
        after = split_by_patient(items + new, seed=5, val_fraction=0.2, test_fraction=0.1)  # 41: still 4 test, 8 val
        after_of = {p: name for name, ps in _patients(after).items() for p in ps}
        if after_of[new[0].patient_key] != "train":
            continue
        checked += 1
        assert {p: after_of[p] for p in before_of} == before_of
    assert checked >= 10


def test_too_few_patients_to_split():
    with pytest.raises(ApplianceError, match="too few"):
        split_by_patient(_items(2), seed=0, val_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------- EpochSampler


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    a = list(EpochSampler(50, seed=1, epoch=0))
    assert sorted(a) == list(range(50, 100))  # keys carry the epoch: (epoch + 1) * n + index
    assert list(EpochSampler(50, seed=1, epoch=0)) == a
    assert list(EpochSampler(50, seed=1, epoch=1)) != a
    assert list(EpochSampler(50, seed=2, epoch=0)) != a
    assert a != list(range(50))
    assert list(EpochSampler(5, seed=1, epoch=3, shuffle=False)) == [20, 21, 22, 23, 24]
    s = EpochSampler(50, seed=1, epoch=0)
    s.set_epoch(1, start=10)
    assert list(s) == list(EpochSampler(50, seed=1, epoch=1))[10:]



def test_epoch_sampler_start_skips_the_first_samples():
    full = list(EpochSampler(20, seed=4, epoch=2))
    resumed = EpochSampler(20, seed=4, epoch=2, start=7)
    assert list(resumed) == full[7:] and len(resumed) == 13


def test_epoch_sampler_shards_are_disjoint_and_equal():
    full = list(EpochSampler(10, seed=0, epoch=5))
    shards = [list(EpochSampler(10, seed=0, epoch=5, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # 10 // 3: every rank takes the same number of steps
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 9 and flat == full[:9]
    # a resumed rank skips within its own shard
    assert list(EpochSampler(10, seed=0, epoch=5, rank=1, world_size=3, start=2)) == shards[1][2:]


# ---------------------------------------------------------------- VolumeReportDataset

FINDINGS = ["emphysema", "lung nodule", "pleural effusion"]
LABELS = [(1, -1, 0), (-1, -1, 1), (0, 0, 0), (-1, -1, -1)]
SHAPE_ZYX = (8, 10, 12)
CROP_XYZ = (8, 6, 4)  # (x, y, z) as site.yaml writes it -> (z, y, x) = (4, 6, 8)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"Report {i}: emphysema, lung nodule and pleural effusion." for i in range(4)]
    corpus += [t.format(p=f) for f in FINDINGS for pair in PROMPT_PAIRS for t in pair]
    return build_site_tokenizer(corpus, vocab_size=200, max_length=16)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    out = []
    for i, labels in enumerate(LABELS):
        # distinct integers below 2048, exact in float16, so a crop's first voxel tells where it starts
        volume = (np.arange(np.prod(SHAPE_ZYX)).reshape(SHAPE_ZYX) + 100 * i).astype(np.float16)
        np.save(root / f"s{i}.npy", volume)
        out.append(TrainingItem(f"s{i}", f"st{i}", f"p{i}", root / f"s{i}.npy", labels,
                                f"Report {i}: emphysema, lung nodule and pleural effusion."))
    return out


def _start_of(item, volume):
    source = np.load(item.npy).astype(np.float32)
    z, y, x = np.argwhere(source == volume[0, 0, 0, 0].item())[0]
    np.testing.assert_array_equal(volume[0].numpy(), source[z:z + 4, y:y + 6, x:x + 8])
    return int(z), int(y), int(x)


def test_eval_takes_the_centre_crop(items, tokenizer):
    ds = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=False)
    assert len(ds) == 4
    for i in range(4):
        sample = ds[i]
        assert sample["volume"].shape == (1, 4, 6, 8) and sample["volume"].dtype == torch.float32
        assert _start_of(items[i], sample["volume"]) == (2, 2, 2)  # ((8-4)//2, (10-6)//2, (12-8)//2)
    ds.set_epoch(3)
    fresh = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=False)
    assert torch.equal(ds[1]["volume"], fresh[1]["volume"])  # the epoch does not move the evaluation crop


def test_train_crops_are_deterministic_per_seed_epoch_index(items, tokenizer):
    a = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=True, seed=7)
    b = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=True, seed=7)
    starts = {}
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(4):
            va = a[i]["volume"]
            assert torch.equal(va, a[i]["volume"])  # the same call twice
            assert torch.equal(va, b[i]["volume"])  # another dataset (another worker) with the same seed
            starts[epoch, i] = _start_of(items[i], va)
            assert all(0 <= s <= n - w for s, n, w in zip(starts[epoch, i], SHAPE_ZYX, (4, 6, 8)))
    for i in range(4):  # the crop moves from epoch to epoch
        assert len({starts[e, i] for e in range(3)}) > 1
    other_seed = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=True, seed=8)
    assert [_start_of(items[i], other_seed[i]["volume"]) for i in range(4)] != [starts[0, i] for i in range(4)]


def test_train_crop_as_large_as_the_volume(items, tokenizer):
    ds = VolumeReportDataset(items, FINDINGS, tokenizer, (12, 10, 8), train=True, seed=0)
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(4):
            np.testing.assert_array_equal(ds[i]["volume"][0].numpy(), np.load(items[i].npy).astype(np.float32))


def test_labels_and_report_tokens(items, tokenizer):
    ds = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=False)
    assert torch.equal(ds.labels, torch.tensor(LABELS, dtype=torch.float32))
    ids, mask = tokenizer.encode([it.text for it in items])
    for i in range(4):
        sample = ds[i]
        assert sample["index"] == i
        assert torch.equal(sample["labels"], torch.tensor(LABELS[i], dtype=torch.float32))
        assert torch.equal(sample["input_ids"], ids[i]) and torch.equal(sample["attention_mask"], mask[i])
    assert "sentence_ids" not in ds[0]


def test_label_sentences_state_one_known_label(items, tokenizer):
    ds = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=True, seed=1, label_sentences=True)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i, labels in enumerate(LABELS):
            sample = ds[i]
            target = sample["sentence_labels"]
            assert target.shape == (3,)
            known = [(c, v) for c, v in enumerate(target.tolist()) if v != -1]
            if all(v == -1 for v in labels):
                assert known == []  # nothing known: the sentence is not supervised
                continue
            assert len(known) == 1
            c, v = known[0]
            assert v == labels[c] and v in (0, 1)
            # the sentence says what the target says: a positive template for 1, a negative one for 0
            templates = [pair[0 if v == 1 else 1].format(p=FINDINGS[c]) for pair in PROMPT_PAIRS]
            ids, mask = tokenizer.encode(templates)
            assert any(torch.equal(sample["sentence_ids"], row) for row in ids)
            assert any(torch.equal(sample["sentence_mask"], row) for row in mask)
            seen.add((i, c))
            again = ds[i]
            assert torch.equal(again["sentence_ids"], sample["sentence_ids"])  # deterministic per (seed, epoch, index)
    # item 0 knows findings 0 and 2, item 2 knows all three; over six epochs more than one is drawn
    assert {c for i, c in seen if i == 0} == {0, 2}
    assert len({c for i, c in seen if i == 2}) >= 2


def test_dataset_reads_the_epoch_from_sampler_keys(items, tokenizer):
    """A persistent worker's dataset copy never sees set_epoch: the key tells it the epoch."""
    ds = VolumeReportDataset(items, FINDINGS, tokenizer, CROP_XYZ, train=True, seed=0)
    n = len(items)
    ds.set_epoch(2)
    direct = ds[1]["volume"]
    ds.set_epoch(0)
    assert torch.equal(ds[(2 + 1) * n + 1]["volume"], direct)
    assert ds[(2 + 1) * n + 1]["index"] == 1
