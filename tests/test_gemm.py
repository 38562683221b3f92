"""Every exact mod-q GEMM backend equals the Python-integer reference, adversarial inputs included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.lwe import gemm
from common.lwe.gemm import byte_limb_matmul, matmul_mod, matmul_mod_reference


def cpu_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stands in for torch._int_mm on CPU: int8 × int8 → int32, exact for the k blocks used."""
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


def cuda_logic_on_cpu(s: np.ndarray, u: np.ndarray, log_q: int, small: str, bound: int) -> np.ndarray:
    st = torch.from_numpy(s.astype(np.int64))
    ut = torch.from_numpy(u.astype(np.uint64).view(np.int64))
    out = byte_limb_matmul(st, ut, log_q, small, bound, cpu_int_mm).numpy().view(np.uint64)
    return out if log_q == 64 else out.astype(np.uint32)


BACKENDS = ["cpu", "cuda-logic"] + (["cuda"] if torch.cuda.is_available() else [])


def run(backend: str, x: np.ndarray, y: np.ndarray, log_q: int, small: str, bound: int) -> np.ndarray:
    if backend == "cuda-logic":
        s, u = (x, y) if small == "left" else (y, x)
        return cuda_logic_on_cpu(s, u, log_q, small, bound)
    return matmul_mod(x, y, log_q=log_q, small=small, small_bound=bound, backend=backend)


def uniform(rng: np.random.Generator, shape: tuple[int, int], log_q: int) -> np.ndarray:
    dtype = np.uint64 if log_q == 64 else np.uint32
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_q", [32, 64])
@pytest.mark.parametrize("small", ["left", "right"])
@pytest.mark.parametrize("bound", [127, 49152])
def test_random_shapes_match_reference(backend: str, log_q: int, small: str, bound: int) -> None:
    rng = np.random.default_rng(log_q * 7 + bound + (small == "left"))
    for m, k, n in [(1, 1, 1), (5, 37, 3), (17, 130, 9)]:
        if small == "left":
            x = rng.integers(-bound, bound + 1, size=(m, k)).astype(np.int32)
            y = uniform(rng, (k, n), log_q)
        else:
            x = uniform(rng, (m, k), log_q)
            y = rng.integers(-bound, bound + 1, size=(k, n)).astype(np.int32)
        got = run(backend, x, y, log_q, small, bound)
        assert got.dtype == (np.uint64 if log_q == 64 else np.uint32)
        assert np.array_equal(got, matmul_mod_reference(x, y, log_q=log_q)), (m, k, n)


def adversarial_weights(k: int) -> np.ndarray:
    rows = [np.full(k, 127), np.full(k, -127), np.tile([127, -127], k // 2), np.zeros(k)]
    return np.stack(rows).astype(np.int8)


def adversarial_uniform(k: int, log_q: int) -> np.ndarray:
    dtype = np.uint64 if log_q == 64 else np.uint32
    top, half = np.iinfo(dtype).max, 1 << (log_q - 1)
    cols = [np.full(k, top), np.full(k, half), np.full(k, half - 1), np.tile([top, 0], k // 2)]
    return np.stack(cols, axis=1).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_q", [32, 64])
@pytest.mark.parametrize("k", [2048, 4096])
def test_adversarial_int8_weights_at_d_in_4096(backend: str, log_q: int, k: int) -> None:
    w, b = adversarial_weights(k), adversarial_uniform(k, log_q)
    got = run(backend, w, b, log_q, "left", 127)
    assert np.array_equal(got, matmul_mod_reference(w, b, log_q=log_q))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_q", [32, 64])
def test_adversarial_secret_at_the_tail_bound(backend: str, log_q: int) -> None:
    # The worker's A·S and H·S: inner dimension n = 2048, |s| = 12σ = 49152 for the exact set.
    k, bound = 2048, 49152
    s = np.stack([np.full(k, bound), np.full(k, -bound), np.tile([bound, -bound], k // 2)], axis=1)
    a = adversarial_uniform(k, log_q).T.copy()
    got = run(backend, a, s.astype(np.int32), log_q, "right", bound)
    assert np.array_equal(got, matmul_mod_reference(a, s, log_q=log_q))


@pytest.mark.parametrize("log_q", [32, 64])
@pytest.mark.parametrize("small", ["left", "right"])
def test_secret_digit_path_for_large_uniform_operands(log_q: int, small: str) -> None:
    """H·S on the worker: a wide hint, a thin secret at 12σ; the secret is split into digits instead."""
    rng = np.random.default_rng(11 + log_q)
    bound = 49152
    s = rng.integers(-bound, bound + 1, size=(2048, 3))
    s[:, 0] = bound
    s[::2, 1] = -bound
    h = uniform(rng, (64, 2048), log_q)
    h[0] = np.iinfo(h.dtype).max
    if small == "left":
        s, h = s.T.copy(), h.T.copy()
        x, y = s, h
    else:
        x, y = h, s
    got = matmul_mod(x, y, log_q=log_q, small=small, small_bound=bound, backend="cpu")
    assert np.array_equal(got, matmul_mod_reference(x, y, log_q=log_q))


def test_signed_digits_recombine_exactly() -> None:
    s = np.array([[-49152, -1, 0, 1, 2047, -2048, 49152]])
    digits = gemm.split_signed_digits(s, 12, 2)
    assert all(np.abs(d).max() <= 2048 for d in digits)
    assert np.array_equal(digits[0] + (digits[1] << 12), s)


def test_float64_small_operand_is_accepted_as_cached_integers() -> None:
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, size=(6, 300)).astype(np.int8)
    b = uniform(rng, (300, 4), 64)
    got = matmul_mod(w.astype(np.float64), b, log_q=64, small="left", small_bound=127, backend="cpu")
    assert np.array_equal(got, matmul_mod_reference(w, b, log_q=64))


def test_limb_split_recombines_modulo_2_64() -> None:
    rng = np.random.default_rng(4)
    u = uniform(rng, (50, 7), 64)
    for width, count in [(32, 2), (22, 3), (16, 4), (8, 8)]:
        limbs = gemm.split_limbs(u, width, count)
        assert all(np.abs(d).max() <= 1 << (width - 1) for d in limbs)
        acc = np.zeros_like(u)
        with np.errstate(over="ignore"):
            for i, d in enumerate(limbs):
                acc += d.view(np.uint64) << np.uint64(width * i)
        assert np.array_equal(acc, u)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_q": 48}, "log_q must be 32 or 64"),
        ({"small": "middle"}, "small must be"),
        ({"small_bound": 1}, "exceeds its stated bound"),
        ({"backend": "tpu"}, "unknown GEMM backend"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    w = np.full((2, 3), 5, dtype=np.int8)
    b = np.zeros((3, 2), dtype=np.uint64)
    args = {"log_q": 64, "small": "left", "small_bound": 127} | kwargs
    with pytest.raises(ValueError, match=message):
        matmul_mod(w, b, **args)


def test_wrong_dtypes_and_shapes_are_refused() -> None:
    w = np.zeros((2, 3), dtype=np.int8)
    with pytest.raises(ValueError, match="uint64"):
        matmul_mod(w, np.zeros((3, 2), dtype=np.int64), log_q=64, small="left", small_bound=127)
    with pytest.raises(ValueError, match="cannot multiply"):
        matmul_mod(w, np.zeros((4, 2), dtype=np.uint64), log_q=64, small="left", small_bound=127)
    with pytest.raises(ValueError, match="signed integer"):
        matmul_mod(w.astype(np.uint8), np.zeros((3, 2), dtype=np.uint64), log_q=64, small="left",
                   small_bound=127)
    with pytest.raises(ValueError, match="too large for exact limbs"):
        gemm.limb_width(1 << 40, 1 << 20)


def test_empty_dimensions() -> None:
    out = matmul_mod(np.zeros((0, 3), np.int8), np.zeros((3, 2), np.uint64), log_q=64, small="left",
                     small_bound=127)
    assert out.shape == (0, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_large_product_matches_cpu() -> None:
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, size=(512, 4096)).astype(np.int8)
    for log_q in (32, 64):
        b = uniform(rng, (4096, 64), log_q)
        cpu = matmul_mod(w, b, log_q=log_q, small="left", small_bound=127, backend="cpu")
        gpu = matmul_mod(w, b, log_q=log_q, small="left", small_bound=127, backend="cuda")
        assert np.array_equal(gpu, cpu)


@pytest.mark.parametrize("bound", [32640, 32767, 8355712])
def test_cuda_logic_byte_digits_cover_bounds_near_a_byte_boundary(bound: int) -> None:
    s = np.array([[bound], [-bound]], dtype=np.int64).T.copy()  # (1, 2)
    u = np.array([[1], [3]], dtype=np.uint64)  # (2, 1)
    got = cuda_logic_on_cpu(s, u, 64, "left", bound)
    assert np.array_equal(got, matmul_mod_reference(s, u, log_q=64))
