"""A small ``tl.dot`` loop kernel whose SASS is known: one [64, 64] tile reduced over K in
BLOCK_K steps (``tests/test_sass.py`` compiles it ahead of time)."""
import triton
import triton.language as tl


@triton.jit
def dot_loop_kernel(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + o_m[:, None] * stride_am + (k0 + o_k)[None, :])
        b = tl.load(b_ptr + (k0 + o_k)[:, None] * stride_bk + o_n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + o_m[:, None] * BLOCK_N + o_n[None, :], acc)
