import numpy as np
import pytest
from kv_util import random_qkv

import refattn
from refattn.core.errors import InputError
from refattn.kvcache import block_attention, blockbert
from refattn.kvcache._common import apply_rope
from refattn.kvcache.block_attention import (
    BlockAttentionParams,
    block_attention_mask,
    local_positions,
    reencode_block_keys,
)
from refattn.kvcache.blockbert import BlockBERTParams, blockbert_mask


def test_block_attention_mask_rule():
    sizes = (3, 2, 4)
    m = block_attention_mask(sizes, 9)
    blk = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for i in range(9):
        for j in range(9):
            want = j <= i and (blk[i] == blk[j] or blk[i] == 2)
            assert m[i, j] == want, (i, j)
    with pytest.raises(InputError, match="add up"):
        block_attention_mask(sizes, 10)


def test_block_attention_runs_and_matches_independent_blocks():
    """A passage block's output equals attention of that block alone (it sees nothing else)."""
    q, k, v = random_qkv(51, Hq=2, Hkv=1, L=12)
    sel = block_attention.select(q, k, v, BlockAttentionParams(block_sizes=(5, 4, 3)))
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    alone = refattn.attention(q[:, :, 5:9], k[:, :, 5:9], v[:, :, 5:9], causal=True)
    np.testing.assert_allclose(out[:, :, 5:9], alone, atol=1e-12)
    full = refattn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :, 9:], full[:, :, 9:], atol=1e-12)  # global block
    with pytest.raises(InputError, match="block_sizes"):
        BlockAttentionParams().validate()


def test_reencoding_gives_training_positions():
    rng = np.random.default_rng(0)
    sizes = (4, 6, 3)
    kp = rng.standard_normal((2, 13, 8))
    local = apply_rope(kp, local_positions(sizes))
    np.testing.assert_allclose(
        reencode_block_keys(local, sizes), apply_rope(kp, np.arange(13)), atol=1e-12
    )


def test_blockbert_mask():
    m = blockbert_mask(4, 3, (0, 1, 2, 0))
    assert m.sum(axis=(1, 2)).tolist() == [3, 3, 3, 3]  # one key block per query block
    assert m[1, 0, 1] and m[1, 2, 0] and m[2, 0, 2]
    assert np.array_equal(blockbert_mask(3, 3), blockbert_mask(3, 3, (0, 1, 2)))
    with pytest.raises(InputError, match="head_shifts"):
        blockbert_mask(2, 2, (0, 1, 1))


def test_blockbert_select_and_attention():
    q, k, v = random_qkv(52, Hq=2, Hkv=2, L=10)
    sel = blockbert.select(q, k, v, BlockBERTParams(num_blocks=2, head_shifts=(0, 1)))
    out = refattn.attention(q, k, v, mask=sel)
    # head 1, query block 0 attends key block 1 only
    ref = refattn.attention(q[:, 1:2, :5], k[:, 1:2, 5:], v[:, 1:2, 5:])
    np.testing.assert_allclose(out[:, 1:2, :5], ref, atol=1e-12)
    with pytest.raises(InputError, match="head_shifts"):
        BlockBERTParams(num_blocks=2, head_shifts=(0, 2)).validate()
    with pytest.raises(InputError, match="num_blocks"):
        # 10 tokens in 6 blocks: blocks of ceil(10/6) = 2 give only 5 blocks
        blockbert.select(q, k, v, BlockBERTParams(num_blocks=6))
    ragged = blockbert.select(q, k, v, BlockBERTParams(num_blocks=4))  # blocks of 3, last of 1
    assert ragged.mask.shape == (1, 2, 4, 4) and ragged.mask.block_q == 3
