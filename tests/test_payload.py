"""Self-describing blocks: every write decodes to its own id; anything mixed or foreign doesn't."""

from collections import Counter

import pytest
from tbagent.payload import HEADER_SIZE, ZERO, Decoded, WriteId, decode_block, make_block, op_at

SEED = 1234
WID = WriteId(epoch=2, thread=3, op=77)


@pytest.mark.parametrize("bsize", [512, 4096, 1 << 20])
def test_block_decodes_to_its_write_id(bsize: int) -> None:
    block = make_block(SEED, 5, WID, bsize)
    assert len(block) == bsize
    assert decode_block(block, SEED, 5) == Decoded("write", WID)


def test_block_is_regenerated_identically_and_differs_per_key() -> None:
    block = make_block(SEED, 5, WID, 4096)
    assert make_block(SEED, 5, WID, 4096) == block
    others = [
        make_block(SEED + 1, 5, WID, 4096),
        make_block(SEED, 6, WID, 4096),
        make_block(SEED, 5, WID._replace(epoch=3), 4096),
        make_block(SEED, 5, WID._replace(thread=4), 4096),
        make_block(SEED, 5, WID._replace(op=78), 4096),
    ]
    # The fill covers the whole block, so even the last sector tells writes apart.
    assert all(other[-512:] != block[-512:] for other in others)


def test_all_zero_block_is_zero() -> None:
    assert decode_block(bytes(4096), SEED, 0) == ZERO


@pytest.mark.parametrize("sector", [0, 1, 6])
def test_block_mixing_two_writes_is_torn(sector: int) -> None:
    old = make_block(SEED, 9, WID, 4096)
    new = make_block(SEED, 9, WID._replace(op=78), 4096)
    cut = (sector + 1) * 512
    torn = decode_block(new[:cut] + old[cut:], SEED, 9)
    assert torn.kind == "torn" and torn.write_id is None and torn.digest


def test_block_half_written_over_zeros_is_torn() -> None:
    new = make_block(SEED, 9, WID, 4096)
    assert decode_block(bytes(2048) + new[2048:], SEED, 9).kind == "torn"
    assert decode_block(new[:2048] + bytes(2048), SEED, 9).kind == "torn"


def test_single_flipped_bit_anywhere_is_torn() -> None:
    block = bytearray(make_block(SEED, 9, WID, 4096))
    for offset in (0, 20, HEADER_SIZE - 1, HEADER_SIZE, 4095):
        flipped = bytearray(block)
        flipped[offset] ^= 1
        assert decode_block(flipped, SEED, 9).kind == "torn", offset


def test_torn_digest_identifies_the_garbage() -> None:
    a, b = b"\x01" * 4096, b"\x02" * 4096
    assert decode_block(a, SEED, 0).digest == decode_block(a, SEED, 0).digest
    assert decode_block(a, SEED, 0).digest != decode_block(b, SEED, 0).digest


def test_valid_block_of_another_lba_or_seed_is_phantom() -> None:
    block = make_block(SEED, 9, WID, 4096)
    assert decode_block(block, SEED, 10) == Decoded("phantom", WID, other_lba=9)
    assert decode_block(block, SEED + 1, 9).kind == "phantom"


def test_decoded_json_round_trip() -> None:
    for value in (
        ZERO,
        Decoded("write", WID),
        Decoded("torn", digest="ab"),
        Decoded("phantom", WID, other_lba=4),
    ):
        assert Decoded.from_json(value.to_json()) == value


def test_op_sequence_is_deterministic_and_follows_the_mix() -> None:
    mix = {"read": 3.0, "write": 1.0, "zero": 0.0}
    ops = [op_at(SEED, 0, i, 16, mix) for i in range(4000)]
    assert ops == [op_at(SEED, 0, i, 16, mix) for i in range(4000)]
    assert ops != [op_at(SEED, 1, i, 16, mix) for i in range(4000)]
    kinds = Counter(kind for kind, _ in ops)
    assert kinds["zero"] == 0
    assert 0.7 < kinds["read"] / len(ops) < 0.8
    assert {lba for _, lba in ops} == set(range(16))


def test_large_block_torn_past_its_first_chunk_is_torn() -> None:
    """A 1 MiB block repeats its 4 KiB chunk: a tear or a flipped bit in the repeats counts."""
    size = 1 << 20
    old = make_block(SEED, 9, WID, size)
    new = make_block(SEED, 9, WID._replace(op=78), size)
    assert decode_block(new, SEED, 9) == Decoded("write", WID._replace(op=78))
    for cut in (HEADER_SIZE + 4096 + 8, size // 2, size - 512):
        assert decode_block(new[:cut] + old[cut:], SEED, 9).kind == "torn", cut
        assert decode_block(new[:cut] + bytes(size - cut), SEED, 9).kind == "torn", cut
    flipped = bytearray(new)
    flipped[size - 1] ^= 0x80
    assert decode_block(flipped, SEED, 9).kind == "torn"
