"""The offline datasets: deterministic, correctly shaped, learnable, and clear when missing."""

import pytest
import torch
import torch.nn as nn

from esper_fast.train import datasets


def test_synthetic_images_are_deterministic_and_balanced():
    images, labels = datasets.synthetic_images(200, seed=3)
    again_images, again_labels = datasets.synthetic_images(200, seed=3)
    other_images, _ = datasets.synthetic_images(200, seed=4)
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (200,)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other_images)
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    # Not a constant or saturated image set: pixels use most of the range.
    assert images.float().std() > 30 and images.min() < 20 and images.max() > 235


def test_synthetic_images_are_learnable_by_a_tiny_model():
    torch.manual_seed(0)
    train = datasets.ImageBatches(*datasets.synthetic_images(1500, seed=1))
    test = datasets.ImageBatches(*datasets.synthetic_images(500, seed=2))

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(3, 8), block(8, 16), block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = datasets.batch_loader(train, batch_size=50, shuffle=True, seed=0, pin_memory=False)
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    x, y = test[list(range(len(test)))]
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    # Chance is 10%; colour alone separates only two groups of five classes (20%), so
    # passing 25% needs the orientation too. About 40% after these 90 steps.
    assert accuracy > 0.25, accuracy


def test_image_batches_normalise_and_index_by_list():
    images, labels = datasets.synthetic_images(20, seed=0)
    dataset = datasets.ImageBatches(images, labels)
    x, y = dataset[[3, 5, 7]]
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)
    assert torch.equal(y, labels[[3, 5, 7]])
    mean, std = torch.tensor(datasets.CIFAR10_MEAN).view(3, 1, 1), torch.tensor(datasets.CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], (images[3].float() / 255 - mean) / std)
    single_x, single_y = dataset[4]
    assert single_x.shape == (3, 32, 32) and single_y == labels[4]
    with pytest.raises(ValueError, match="uint8"):
        datasets.ImageBatches(images.float(), labels)


def test_batch_loader_shuffles_reproducibly_and_keeps_the_tail():
    dataset = datasets.ImageBatches(*datasets.synthetic_images(70, seed=0))
    first = [y for _, y in datasets.batch_loader(dataset, 32, shuffle=True, seed=5, pin_memory=False)]
    second = [y for _, y in datasets.batch_loader(dataset, 32, shuffle=True, seed=5, pin_memory=False)]
    loader = datasets.batch_loader(dataset, 32, shuffle=False, seed=5, pin_memory=False)
    assert len(loader) == 3 and [len(y) for y in first] == [32, 32, 6]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.cat([y for _, y in loader]), dataset.labels)
    assert not torch.equal(torch.cat(first), dataset.labels)


def test_cifar10_loaders_fall_back_to_the_generated_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    bundle = datasets.cifar10_loaders(batch_size=64, synthetic_train=200, synthetic_test=100)
    assert bundle.source == "synthetic-cifar10" and "generated offline set" in bundle.description
    x, y = next(iter(bundle.trainloader))
    assert x.shape == (64, 3, 32, 32) and y.max() < 10
    assert len(bundle.testloader) == 2


def test_cifar10_loaders_with_a_missing_data_root_say_where_they_looked(tmp_path):
    with pytest.raises(datasets.DataError, match="CIFAR-10 not found under --data-root .*cifar-10-batches-py"):
        datasets.cifar10_loaders(data_root=str(tmp_path / "nowhere"))


def test_cifar10_loaders_with_a_corrupted_data_root_fail_clearly(tmp_path):
    pytest.importorskip("torchvision")
    folder = tmp_path / datasets.CIFAR10_FOLDER
    folder.mkdir()
    (folder / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(datasets.DataError, match="incomplete or corrupted"):
        datasets.cifar10_loaders(data_root=str(tmp_path))


def test_byte_tokens_round_trip_and_fit_the_vocabulary():
    text = "Once upon a time, Lily said \"hé\".\n"
    tokens = datasets.encode_bytes(text)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < datasets.BYTE_VOCAB_SIZE
    assert datasets.decode_bytes(tokens) == text


def test_token_blocks_shift_targets_by_one():
    tokens = torch.arange(23)
    blocks = datasets.TokenBlocks(tokens, seq_len=5)
    assert len(blocks) == 4
    x, y = blocks[[0, 3]]
    assert torch.equal(x[1], torch.arange(15, 20)) and torch.equal(y[1], torch.arange(16, 21))
    single_x, single_y = blocks[2]
    assert torch.equal(single_y, single_x + 1)


def test_tinystories_loaders_from_a_file_and_from_the_generated_corpus(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(datasets.synthetic_stories(40, seed=0), encoding="utf-8")
    bundle = datasets.tinystories_loaders(text_path=str(path), seq_len=32, batch_size=4)
    x, y = next(iter(bundle.trainloader))
    assert bundle.source == "text-file" and x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    generated = datasets.tinystories_loaders(seq_len=64, batch_size=8, synthetic_stories_count=50)
    assert generated.source == "synthetic-text" and len(generated.testloader) >= 1
    assert datasets.synthetic_stories(5, seed=2) == datasets.synthetic_stories(5, seed=2)


def test_tinystories_loaders_reject_missing_or_too_short_text(tmp_path):
    with pytest.raises(datasets.DataError, match="text file not found"):
        datasets.tinystories_loaders(text_path=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(datasets.DataError, match="too short"):
        datasets.tinystories_loaders(text_path=str(short), seq_len=64)
    with pytest.raises(datasets.DataError, match="vocabulary of at least 256"):
        datasets.tinystories_loaders(vocab_size=100)


def test_a_text_file_is_read_as_bytes_one_token_each(tmp_path):
    path = tmp_path / "binary.bin"
    payload = bytes(range(256)) * 40  # not UTF-8: decoding would replace bytes
    path.write_bytes(payload)
    bundle = datasets.tinystories_loaders(text_path=str(path), seq_len=16, batch_size=4)
    dataset = bundle.trainloader.dataset
    assert torch.equal(dataset.tokens, torch.tensor(list(payload[: int(len(payload) * 0.9)])))
    import hashlib

    assert bundle.fingerprint == hashlib.sha256(payload).hexdigest()


def test_an_empty_text_file_is_a_data_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(datasets.DataError, match="is empty"):
        datasets.tinystories_loaders(text_path=str(path))
    assert datasets.encode_bytes(b"").shape == (0,)


def test_the_shuffle_generator_is_the_batch_order():
    dataset = datasets.ImageBatches(*datasets.synthetic_images(40, seed=0))
    loader = datasets.batch_loader(dataset, 8, shuffle=True, seed=3, pin_memory=False)
    generator = datasets.shuffle_generator(loader)
    state = generator.get_state()
    first = [y for _, y in loader]
    generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader]))
    assert datasets.shuffle_generator(datasets.batch_loader(dataset, 8, shuffle=False, seed=3, pin_memory=False)) is None
