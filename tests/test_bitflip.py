"""flip_bit against bitstring, the independent oracle, on edge and random values."""
import math

import pytest
import torch
from bitstring import BitArray

from trainables.inject.bitflip import bit_field, bit_from_msb_first, dtype_width, flip_bit

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def edge_values(dtype):
    info = torch.finfo(dtype)
    smallest_subnormal = info.smallest_normal * info.eps  # 2**-(bias-1) * 2**-mantissa_bits
    return [0.0, -0.0, smallest_subnormal, -smallest_subnormal, info.smallest_normal - smallest_subnormal,
            info.smallest_normal, -info.smallest_normal, info.max, -info.max, math.inf, -math.inf, math.nan,
            1.0, -1.5, 3.140625]


def oracle_bits(value: float, dtype) -> BitArray:
    """Encode ``value`` with bitstring's own float codecs (not torch's)."""
    if dtype == torch.bfloat16:
        return BitArray(bfloat=value)
    return BitArray(float=value, length=dtype_width(dtype))


def raw(t: torch.Tensor) -> list[int]:
    width = dtype_width(t.dtype)
    return [int(v) & ((1 << width) - 1) for v in t.view(INT[t.dtype]).tolist()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bit_of_edge_and_random_values_matches_bitstring(dtype):
    width = dtype_width(dtype)
    values = torch.tensor(edge_values(dtype), dtype=torch.float64)
    values = torch.cat([values, torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 100])
    t = values.to(dtype)
    assert raw(t)[2] == 1  # the smallest subnormal really is bit pattern ...0001
    for bit in range(width):
        flipped = flip_bit(t, bit)
        for before, after, value, got in zip(raw(t), raw(flipped), t.double().tolist(), flipped.double().tolist()):
            expected = BitArray(uint=before, length=width)
            expected.invert(width - 1 - bit)  # bitstring indexes MSB-first
            assert after == expected.uint
            if not math.isnan(value):
                # decoding through bitstring's float codec agrees with torch's reinterpretation
                oracle = oracle_bits(value, dtype)
                assert oracle.uint == before
                oracle.invert(width - 1 - bit)
                decoded = oracle.bfloat if dtype == torch.bfloat16 else oracle.float
                assert (math.isnan(decoded) and math.isnan(got)) or decoded == got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flipping_twice_restores_every_bit_pattern(dtype):
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(dtype)
    bits = torch.randint(0, dtype_width(dtype), (1000,), generator=torch.Generator().manual_seed(2))
    once = flip_bit(t, bits)
    assert (once.view(INT[dtype]) != t.view(INT[dtype])).all()
    assert torch.equal(flip_bit(once, bits).view(INT[dtype]), t.view(INT[dtype]))


def test_known_fp32_flips():
    one = torch.tensor([1.0])
    assert flip_bit(one, 31).item() == -1.0
    assert flip_bit(one, 30).item() == math.inf  # 0x3f800000 ^ 0x40000000 = 0x7f800000
    assert flip_bit(one, 22).item() == 1.5
    assert flip_bit(one, 0).item() == 1.0 + 2**-23
    assert flip_bit(torch.tensor([0.5]), 30).item() == 2.0**127 * 1.0


def test_flip_returns_new_tensor_and_keeps_shape_and_device():
    t = torch.ones(2, 3, 4)
    out = flip_bit(t, 31)
    assert out.shape == t.shape and out.dtype == t.dtype and out.data_ptr() != t.data_ptr()
    assert (t == 1).all() and (out == -1).all()


def test_tensor_bit_broadcasts_per_row():
    t = torch.ones(3, 2)
    out = flip_bit(t, torch.tensor([[31], [22], [0]]))
    assert out.tolist() == [[-1.0, -1.0], [1.5, 1.5], [1.0 + 2**-23] * 2]


@pytest.mark.parametrize("bad", [-1, 32, 100, 3.0, True])
def test_bit_outside_width_is_refused(bad):
    with pytest.raises(ValueError, match=r"allowed 0\.\.31"):
        flip_bit(torch.ones(2), bad)


def test_bit_tensor_outside_width_is_refused():
    with pytest.raises(ValueError, match=r"allowed 0\.\.15"):
        flip_bit(torch.ones(2, dtype=torch.float16), torch.tensor([3, 16]))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int8, torch.bool, torch.qint8])
def test_integer_and_quantized_dtypes_are_not_supported_yet(dtype):
    t = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, dtype) if dtype == torch.qint8 else torch.ones(2, dtype=dtype)
    with pytest.raises(ValueError, match="not supported yet"):
        flip_bit(t, 0)


def test_msb_first_conversion_and_fields():
    assert bit_from_msb_first(0) == 31  # the seed's 0 = sign
    assert bit_from_msb_first(1) == 30  # exponent MSB
    assert bit_from_msb_first(31) == 0
    assert bit_from_msb_first(0, torch.bfloat16) == 15
    with pytest.raises(ValueError, match=r"outside 0\.\.31"):
        bit_from_msb_first(32)
    assert [bit_field(b) for b in (31, 30, 23, 22, 0)] == ["sign", "exponent", "exponent", "mantissa", "mantissa"]
    assert [bit_field(b, torch.bfloat16) for b in (15, 14, 7, 6)] == ["sign", "exponent", "exponent", "mantissa"]
    assert [bit_field(b, torch.float16) for b in (15, 14, 10, 9)] == ["sign", "exponent", "exponent", "mantissa"]
