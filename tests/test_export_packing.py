"""Bit-stream packing: hand-computed words, round trips, and the readers' own packers as oracles."""

import os

import pytest
import torch

from sliderquant.export.packing import (pack_columns, pack_rows, packed_width, unpack_columns,
                                        unpack_rows)


def _u32(words):
    return [w & 0xFFFFFFFF for w in words.flatten().tolist()]


def test_four_bit_words_by_hand():
    # eight nibbles per word, first value in the lowest nibble
    words = pack_rows(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0]]), 4)
    assert _u32(words) == [0x87654321, 0x0000000F]


def test_two_and_eight_bit_words_by_hand():
    assert _u32(pack_rows(torch.tensor([[3, 0, 1, 2] + [0] * 12 + [1]]), 2)) == [0b10010011, 1]
    # the top byte 0xFF makes the int32 negative; the bit pattern is what is stored
    w = pack_rows(torch.tensor([[0x01, 0x80, 0x7F, 0xFF]]), 8)
    assert _u32(w) == [0xFF7F8001] and int(w[0, 0]) < 0


def test_three_bit_fields_straddle_words():
    # 11 values of 3 bits: value 10 takes stream bits 30..32, its top bit is bit 0 of word 1
    vals = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 7, 5]
    expect = 0
    for i, v in enumerate(vals):
        expect |= v << (3 * i)
    words = pack_rows(torch.tensor([vals]), 3)
    assert words.shape == (1, 2)
    assert _u32(words) == [expect & 0xFFFFFFFF, expect >> 32]
    assert (expect >> 32) & 1 == 1            # the straddling bit really landed in word 1


def test_gptq_three_bit_words_by_hand():
    # GPTQ's documented 10 | 1 | 10 | 1 | 10 layout of 32 rows in 3 words, for one column
    rows = torch.arange(32) % 8
    w = pack_columns(rows[:, None], 3)
    assert w.shape == (3, 1)
    w0, w1, w2 = _u32(w)
    assert [(w0 >> (3 * j)) & 7 for j in range(10)] == rows[:10].tolist()
    assert (w0 >> 30) | ((w1 & 1) << 2) == int(rows[10])
    assert [(w1 >> (1 + 3 * j)) & 7 for j in range(10)] == rows[11:21].tolist()
    assert (w1 >> 31) | ((w2 & 3) << 1) == int(rows[21])
    assert [(w2 >> (2 + 3 * j)) & 7 for j in range(10)] == rows[22:32].tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 37, 96])
def test_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    v = torch.randint(0, 1 << bits, (5, n), generator=g)
    words = pack_rows(v, bits)
    assert words.shape == (5, packed_width(n, bits)) and words.dtype == torch.int32
    assert torch.equal(unpack_rows(words, bits, n), v)
    assert torch.equal(unpack_columns(pack_columns(v.t(), bits), bits, n), v.t())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="lie in"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="lie in"):
        pack_rows(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="2 to 8"):
        pack_rows(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match="integer"):
        pack_rows(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="fewer"):
        unpack_rows(torch.zeros(1, 1, dtype=torch.int32), 4, 9)


def require_reader(module):
    """Import a third-party reader: fails under CI (CI=true) when missing, skips elsewhere."""
    try:
        return pytest.importorskip(module)
    except pytest.skip.Exception:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is required under CI (install the export extra)", pytrace=False)
        raise


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_matches_compressed_tensors_packer(bits):
    require_reader("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 1 << bits, (6, 45), generator=g)
    # the library packs signed codes (adds 2^(b-1) itself); its stored fields are our unsigned codes
    signed = (v - (1 << (bits - 1))).to(torch.int8)
    theirs = pack_to_int32(signed, bits, packed_dim=1)
    assert torch.equal(theirs, pack_rows(v, bits))
    assert torch.equal(unpack_from_int32(pack_rows(v, bits), bits, torch.Size(v.shape), packed_dim=1),
                       signed)
    # zero points: packed along dim 0
    assert torch.equal(pack_to_int32(signed, bits, packed_dim=0), pack_columns(v, bits))
