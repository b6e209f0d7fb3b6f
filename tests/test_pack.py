import pytest
import torch

from qrobust.errors import QrobustError
from qrobust.quant.pack import (pack_qweight, pack_qzeros, repack_qweight, unpack_qweight, unpack_qzeros,
                                 values_per_chunk)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (48, 96), generator=g)
    qweight = pack_qweight(q, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (96 * bits // 32, 48)
    assert torch.equal(unpack_qweight(qweight, bits, 96), q.to(torch.int32))
    zeros = torch.randint(0, 2**bits, (3, 96), generator=g)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (3, 96 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 96), zeros.to(torch.int32))


def test_four_bit_layout_matches_gptq_loaders():
    """AutoGPTQ/GPTQModel read input i of column j as (qweight[i // 8, j] >> 4·(i % 8)) & 15."""
    q = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(0))
    qweight = pack_qweight(q, 4).to(torch.int64) & 0xFFFFFFFF
    for i in range(64):
        assert torch.equal((qweight[i // 8] >> (4 * (i % 8))) & 15, q[:, i])


def test_three_bit_values_straddle_word_boundaries():
    """32 three-bit values fill 3 words; value 10 uses bits 30–31 of word 0 and bit 0 of word 1."""
    assert values_per_chunk(3) == 32
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 10] = 0b111
    words = pack_qweight(q, 3).to(torch.int64).flatten() & 0xFFFFFFFF
    assert words.tolist() == [0b11 << 30, 0b1, 0]
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 21] = 0b111
    words = pack_qweight(q, 3).to(torch.int64).flatten() & 0xFFFFFFFF
    assert words.tolist() == [0, 1 << 31, 0b11]


def test_packing_refuses_sizes_it_cannot_pack():
    with pytest.raises(QrobustError, match="multiple of 32"):
        pack_qweight(torch.zeros(4, 48, dtype=torch.int64), 3)


def test_three_bit_pairs_layout_puts_neighbouring_inputs_16_bits_apart():
    """In the pairs layout value 2i + 1 sits 16 bits above value 2i (10 values a word, at bits
    3i), and values 30 and 31 take bit 15 and bit 31 of each word, low bit first; it round-trips,
    and repacking goes both ways."""
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 12], q[0, 13] = 0b101, 0b011  # word 1, i = 1
    words = pack_qweight(q, 3, "pairs").to(torch.int64).flatten() & 0xFFFFFFFF
    assert words.tolist() == [0, 0b101 << 3 | 0b011 << 19, 0]
    q = torch.zeros(1, 32, dtype=torch.int64)
    q[0, 30], q[0, 31] = 0b110, 0b001
    words = pack_qweight(q, 3, "pairs").to(torch.int64).flatten() & 0xFFFFFFFF
    assert words.tolist() == [1 << 31, 1 << 15, 1 << 15]
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 8, (24, 96), generator=g)
    gptq, pairs = pack_qweight(q, 3), pack_qweight(q, 3, "pairs")
    assert torch.equal(unpack_qweight(pairs, 3, 96, "pairs"), q.to(torch.int32))
    assert torch.equal(repack_qweight(gptq, 3, 96, "gptq", "pairs"), pairs)
    assert torch.equal(repack_qweight(pairs, 3, 96, "pairs", "gptq"), gptq)
    with pytest.raises(QrobustError, match="no 'pairs' packing layout for 4-bit"):
        pack_qweight(torch.zeros(4, 32, dtype=torch.int64), 4, "pairs")
