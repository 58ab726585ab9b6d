import torch

from workers.batch import DecodeBatch, cache_from_tensors, cache_tensors


def one_row(length: int, fill: float, row: str) -> DecodeBatch:
    keys = torch.full((1, 2, length, 4), fill)
    cache = cache_from_tensors([(keys, keys + 100), (keys * 2, keys * 2 + 100)])
    return DecodeBatch.from_prefill(cache, length, first_token=int(fill), row=row, device="cpu")


def test_concatenate_left_pads_once():
    batch = DecodeBatch.concatenate([one_row(3, 1.0, "a"), one_row(5, 2.0, "b"), one_row(1, 3.0, "c")])
    assert batch.rows == ["a", "b", "c"]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert batch.positions.tolist() == [3, 5, 1] and batch.last_tokens.tolist() == [1, 2, 3]
    keys, values = cache_tensors(batch.cache)[0]
    assert keys.shape == (3, 2, 5, 4)
    assert keys[0, :, :2].abs().sum() == 0 and bool((keys[0, :, 2:] == 1).all())
    assert bool((values[2, :, 4:] == 103).all())
    assert batch.cache.get_seq_length() == 5


def test_decode_inputs_and_advance():
    batch = DecodeBatch.concatenate([one_row(2, 1.0, "a"), one_row(3, 2.0, "b")])
    inputs = batch.decode_inputs()
    assert inputs["input_ids"].tolist() == [[1], [2]]
    assert inputs["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert inputs["position_ids"].tolist() == [[2], [3]]
    batch.advance(batch.cache, torch.tensor([7, 8]))
    assert batch.positions.tolist() == [3, 4] and batch.last_tokens.tolist() == [7, 8]
    assert batch.cache_length == 4


def test_filter_selects_rows_and_trims_shared_padding():
    batch = DecodeBatch.concatenate([one_row(2, 1.0, "a"), one_row(6, 2.0, "b"), one_row(3, 3.0, "c")])
    kept = batch.filter([0, 2])
    assert kept.rows == ["a", "c"]
    assert kept.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    keys, _ = cache_tensors(kept.cache)[1]
    assert keys.shape == (2, 2, 3, 4) and bool((keys[1] == 6).all())
    assert kept.positions.tolist() == [2, 3]
    assert batch.filter([]) is None
    assert batch.filter([0, 1, 2]) is batch


def test_slab_cache_writes_in_place_and_grows():
    batch = one_row(3, 1.0, "a")
    layer = batch.cache.layers[0]
    buffer = layer.kbuf
    new = torch.full((1, 2, 1, 4), 9.0)
    keys, _ = batch.cache.update(new, new, 0)
    assert keys.shape == (1, 2, 4, 4) and layer.kbuf is buffer and bool((keys[:, :, 3] == 9).all())
    for _ in range(layer.capacity):  # past the capacity it grows and keeps what it held
        keys, _ = batch.cache.update(new, new, 0)
    assert layer.capacity > buffer.shape[2] and bool((keys[:, :, :3] == 1).all()) and bool((keys[:, :, 3:] == 9).all())


def test_rows_in_steps_some_rows_on_the_batch_own_cache_even_when_full():
    batch = DecodeBatch.concatenate([one_row(2, 1.0, "a"), one_row(63, 2.0, "b"), one_row(3, 3.0, "c")])
    for layer in batch.cache.layers:  # one step more fills every buffer
        layer.update(torch.full((3, 2, 1, 4), 5.0), torch.full((3, 2, 1, 4), 5.0))
    layer = batch.cache.layers[0]
    assert layer.length == layer.capacity == 64
    part = batch.rows_in(1, 3)
    assert part.rows == ["b", "c"] and part.attention_mask.tolist() == batch.attention_mask[1:].tolist()
    assert part.positions.tolist() == [63, 3] and part.last_tokens.tolist() == [2, 3]
    new = torch.full((2, 2, 1, 4), 9.0)
    keys, _ = part.cache.update(new, new, 0)
    assert keys.shape == (2, 2, 65, 4) and layer.length == 64  # the batch's own length moves at `advance`
    assert bool((layer.kbuf[1:, :, 64] == 9).all()) and bool((layer.kbuf[0, :, 64] == 0).all())
    assert bool((layer.kbuf[2, :, 62] == 3).all()) and bool((layer.kbuf[:, :, 63] == 5).all())  # what it held


def test_rope_deltas_follow_their_rows_through_merges_and_filters():
    """M-RoPE rows decode at their token count plus their own rope delta, on all three axes, whoever joins or leaves."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    keys = torch.ones((2, 2, 3, 4))
    cache = cache_from_tensors([(keys, keys)])
    part = DecodeBatch.from_prefill_batch(cache, mask, [5, 6], ["a", "b"], "cpu", torch.tensor([-4, 0]), 3)
    joining = DecodeBatch.from_prefill_batch(cache, mask, [7, 8], ["c", "d"], "cpu", torch.tensor([-12, 2]), 3)
    batch = DecodeBatch.concatenate([part, joining.filter([0])])
    assert batch.positions.tolist() == [-2, 3, -10]
    assert batch.decode_inputs()["position_ids"].tolist() == [[[-2], [3], [-10]]] * 3
    batch.advance(batch.cache, torch.tensor([1, 2, 3]))
    kept = batch.filter([2, 0])
    assert kept.rows == ["c", "a"] and kept.position_axes == 3
    assert kept.decode_inputs()["position_ids"].tolist() == [[[-9], [-1]]] * 3
