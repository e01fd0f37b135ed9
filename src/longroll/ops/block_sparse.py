"""Block-sparse attention with an optional per-key logit bias.

Each query block of ``index`` (a :class:`~longroll.ops.block_index.BlockSparseIndex`) attends only to the key
blocks its row lists; the bias (batch, heads_kv, seqlen_k) is added to the scaled logit of every key, and a
bias <= ``MASKED_BIAS`` removes the key. Rows left without any key give out 0 and lse -inf.

Backends (``backend=``):

- ``"triton"``: the fused kernel of :mod:`longroll.kernels.block_sparse_fwd` (CUDA, or CPU under
  ``TRITON_INTERPRET=1`` for tests). Reads (B, H, L, D) and (B, L, H, D) views without copies; the output
  keeps q's memory layout. Its tiles are autotuned apart from the index blocks (a 128-row index block may be
  served by two 64-row programs). Two schedules (``schedule``): "grid" runs one program per tile of query
  rows, and may split a row's key blocks over several programs whose partial results are merged by their
  log-sum-exp (``split_k``); "persistent" runs a fixed set of programs, about one per multiprocessor slot,
  that share every row's key blocks evenly, merging the rows a share boundary cuts.
- ``"torch"``: a pure-torch twin that gathers the selected key blocks of a chunk of query blocks at a time
  (memory bounded by ``max_elements``) and accumulates in float32. Runs everywhere.
- ``"auto"``: ``"triton"`` for CUDA tensors the kernel supports, ``"torch"`` otherwise.

:func:`block_sparse_attention_ref` is the obviously-right twin: the index expanded into a dense key mask and
fed to :func:`~longroll.ops.reference.attention_ref`.

A key block listed twice in one row is counted twice by both backends (and once by the reference);
``check_ids=True`` rejects that, together with out-of-range ids and counts.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Literal

import torch

from longroll.ops._checks import check_bias, check_qkv
from longroll.ops.block_index import BlockSparseIndex
from longroll.ops.reference import attention_ref
from longroll.ops.types import MASKED_BIAS, AttentionOutput

BlockSparseBackend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
BlockSparseSchedule = Literal["grid", "persistent"]
SCHEDULES: tuple[str, ...] = ("grid", "persistent")
#: Head dims (of q, k and v alike) the Triton kernel is built for.
TRITON_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128, 256)
#: Index block sizes (either axis) the Triton kernel accepts; they are its tile sizes.
TRITON_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
#: Most programs the triton backend splits one row's key blocks over (``split_k``).
MAX_SPLIT_K = 16
#: Keys of ``triton_config`` (see :func:`block_sparse_attention`).
TRITON_CONFIG_KEYS: tuple[str, ...] = (
    "BLOCK_M",
    "BLOCK_N",
    "num_warps",
    "num_stages",
    "USE_TMA",
    "tuning",
    "num_programs",
)


def _kernel_module() -> ModuleType:
    try:
        return importlib.import_module("longroll.kernels.block_sparse_fwd")
    except ImportError as exc:  # triton missing or broken
        raise ValueError(f"backend='triton' needs triton, which failed to import: {exc}") from exc


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_problem(q: torch.Tensor, v: torch.Tensor, index: BlockSparseIndex) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None if it can."""
    d = q.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        return f"q has head_dim {d}; the triton backend supports head_dim in {TRITON_HEAD_DIMS}"
    if v.shape[-1] != d:
        return f"v has head_dim {v.shape[-1]}; the triton backend needs it equal to q's head_dim {d}"
    if q.dtype not in TRITON_DTYPES:
        return f"q has dtype {q.dtype}; the triton backend supports {TRITON_DTYPES}"
    for name in ("q_block_size", "kv_block_size"):
        value = getattr(index, name)
        if value not in TRITON_BLOCK_SIZES:
            return f"index.{name} is {value}; the triton backend supports block sizes {TRITON_BLOCK_SIZES}"
    # One q tile plus one k and one v tile must fit the 227 KiB of shared memory an H100 block can have.
    smem = (index.q_block_size + 2 * index.kv_block_size) * d * q.element_size()
    if smem > 227 * 1024:
        return (
            f"index blocks ({index.q_block_size}, {index.kv_block_size}) at head_dim {d} in {q.dtype} need "
            f"{smem // 1024} KiB of shared memory per program (max 227); use smaller blocks"
        )
    if not q.is_cuda and not _interpreting():
        return f"q is on {q.device}; the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"
    return None


def _check_index(index: BlockSparseIndex, q: torch.Tensor, k: torch.Tensor) -> None:
    if not isinstance(index, BlockSparseIndex):
        raise ValueError(f"index must be a BlockSparseIndex, got {type(index).__name__}")
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    if index.seqlen_q != lq:
        raise ValueError(f"index.seqlen_q is {index.seqlen_q} but q has seqlen_q {lq} (shape {tuple(q.shape)})")
    if index.seqlen_k != lk:
        raise ValueError(f"index.seqlen_k is {index.seqlen_k} but k has seqlen_k {lk} (shape {tuple(k.shape)})")
    ib, ih = index.batch, index.num_heads
    if ib not in (1, b) or ih not in (1, h):
        raise ValueError(
            f"index.kv_num_blocks has shape {tuple(index.kv_num_blocks.shape)}; its (batch, heads) must be "
            f"({b} or 1, {h} or 1) to match q {tuple(q.shape)}"
        )
    if index.device != q.device:
        raise ValueError(f"index is on {index.device} but q is on {q.device}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: BlockSparseBackend = "auto",
    check_ids: bool = False,
    max_elements: int = 1 << 25,
    split_k: int | None = None,
    schedule: BlockSparseSchedule = "grid",
    triton_config: Mapping[str, Any] | None = None,
) -> AttentionOutput:
    """Block-sparse attention of q over (k, v) with an optional per-key logit bias.

    Args:
        q: (batch, heads, seqlen_q, head_dim); any strides (e.g. a (B, L, H, D) tensor's ``transpose(1, 2)``).
        k: (batch, heads_kv, seqlen_k, head_dim); heads_kv divides heads.
        v: (batch, heads_kv, seqlen_k, head_dim_v); the triton backend needs head_dim_v == head_dim.
        index: key blocks per query block; kv_num_blocks (B or 1, H or 1, nqb), seqlen_q/seqlen_k equal to
            q's and k's.
        bias: (batch, heads_kv, seqlen_k) float, added to the scaled logits; <= MASKED_BIAS removes a key.
        scale: logit scale, default 1/sqrt(head_dim).
        backend: "auto", "triton" or "torch" (see the module docstring).
        check_ids: also check counts and ids against the index bounds (synchronises the host).
        max_elements: cap on the elements the torch backend holds per chunk.
        split_k: triton backend only: split each row's key blocks over up to this many programs, merging their
            partial results by log-sum-exp (1: no split). None (default) splits when the programs would fill
            the GPU's multiprocessors in few, partly empty waves and rows are long (see
            ``longroll.kernels.block_sparse_fwd.auto_split_k``); rows with few blocks are never split. Applies
            to the grid schedule only.
        schedule: triton backend only: "grid" (default) or "persistent". On an H100 (triton 3.6) the
            persistent schedule measured slower at every shape (results/gpu/kernels_schedules_h100.json): its
            even shares do not make up for a slower inner loop.
        triton_config: triton backend only, for tuning sweeps and tests: ``{"tuning": "legacy"}`` autotunes
            over the tiles used before tiles were decoupled from the index blocks; any of ``BLOCK_M``,
            ``BLOCK_N`` (kernel tile, a power of two >= 16 dividing the index block), ``num_warps``,
            ``num_stages`` forces one configuration; ``USE_TMA`` forces the copy-engine path on or off;
            ``num_programs`` sets the persistent schedule's program count.
            None autotunes.

    Returns:
        :class:`AttentionOutput`: out (batch, heads, seqlen_q, head_dim_v) in q.dtype and lse
        (batch, heads, seqlen_q) float32 (natural log; -inf where a row has no key).

    Raises:
        ValueError naming the offending argument; all checks run before any launch.
    """
    _, _, _, _, _, d = check_qkv(q, k, v)
    check_bias(bias, k)
    _check_index(index, q, k)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    scale = float(scale)
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    if split_k is not None and (
        isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= MAX_SPLIT_K
    ):
        raise ValueError(f"split_k must be None or an int in [1, {MAX_SPLIT_K}], got {split_k!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "persistent" and split_k not in (None, 1):
        raise ValueError(f"split_k={split_k} applies to the grid schedule; schedule='persistent' balances rows itself")
    config = _check_triton_config(triton_config, index)
    problem = _triton_problem(q, v, index)
    if backend == "auto":
        backend = "triton" if q.is_cuda and problem is None else "torch"
        if backend == "triton":
            try:
                kernels = _kernel_module()
            except ValueError:
                backend = "torch"
    if backend == "triton":
        if problem is not None:
            raise ValueError(problem)
        kernels = _kernel_module()
        if not q.is_cuda and not kernels.INTERPRET:
            raise ValueError(
                "q is on the CPU but longroll.kernels.block_sparse_fwd was imported before TRITON_INTERPRET=1 "
                "was set; set it before the first import"
            )
    if check_ids:
        index.validate_ids()
    if backend == "triton":
        return _triton(kernels, q, k, v, index, bias, scale, split_k, config, schedule)
    return _torch_backend(q, k, v, index, bias, scale, max_elements)


def _check_triton_config(config: Mapping[str, Any] | None, index: BlockSparseIndex) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ValueError(f"triton_config must be a mapping or None, got {type(config).__name__}")
    out = dict(config)
    unknown = sorted(set(out) - set(TRITON_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"triton_config keys {unknown} are not among {TRITON_CONFIG_KEYS}")
    if out.get("tuning", "auto") not in ("auto", "legacy"):
        raise ValueError(f"triton_config['tuning'] must be 'auto' or 'legacy', got {out['tuning']!r}")
    for name, block in (("BLOCK_M", index.q_block_size), ("BLOCK_N", index.kv_block_size)):
        if name in out:
            t = out[name]
            if isinstance(t, bool) or not isinstance(t, int) or not 16 <= t <= block or block % t:
                raise ValueError(
                    f"triton_config['{name}'] must be a power of two in [16, {block}] dividing the index block "
                    f"{block}, got {t!r}"
                )
    if "num_programs" in out and (
        isinstance(out["num_programs"], bool) or not isinstance(out["num_programs"], int) or out["num_programs"] < 1
    ):
        raise ValueError(f"triton_config['num_programs'] must be a positive int, got {out['num_programs']!r}")
    if "num_warps" in out and out["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"triton_config['num_warps'] must be 1, 2, 4, 8 or 16, got {out['num_warps']!r}")
    if "num_stages" in out and (
        isinstance(out["num_stages"], bool) or not isinstance(out["num_stages"], int) or out["num_stages"] < 1
    ):
        raise ValueError(f"triton_config['num_stages'] must be a positive int, got {out['num_stages']!r}")
    if "USE_TMA" in out and not isinstance(out["USE_TMA"], bool):
        raise ValueError(f"triton_config['USE_TMA'] must be a bool, got {out['USE_TMA']!r}")
    return out


def _expanded(index: BlockSparseIndex, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    nqb, w = index.n_q_blocks, index.max_blocks
    return index.kv_num_blocks.expand(b, h, nqb), index.kv_indices.expand(b, h, nqb, w)


def _triton(
    kernels: ModuleType,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    bias: torch.Tensor | None,
    scale: float,
    split_k: int | None = None,
    config: dict[str, Any] | None = None,
    schedule: str = "grid",
) -> AttentionOutput:
    b, h, lq, _ = q.shape
    # empty_like keeps q's layout when it is a permuted dense tensor, so (B, L, H, D) callers get one back.
    out = torch.empty_like(q)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if lq == 0:
        return AttentionOutput(out, lse)
    if k.shape[2] == 0 or index.max_blocks == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return AttentionOutput(out, lse)
    num, idx = _expanded(index, b, h)
    bias32 = None if bias is None else bias.to(torch.float32)
    config = dict(config or {})
    tuning = config.pop("tuning", "auto")
    qb, kb = index.q_block_size, index.kv_block_size
    kernels.launch(q, k, v, bias32, num, idx, out, lse, scale, qb, kb, config or None, split_k, tuning, schedule)
    return AttentionOutput(out, lse)


def _torch_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    bias: torch.Tensor | None,
    scale: float,
    max_elements: int,
) -> AttentionOutput:
    b, h, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    bm, bn = index.q_block_size, index.kv_block_size
    nqb, nkb, w = index.n_q_blocks, index.n_kv_blocks, index.max_blocks
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(b, h, lq, dv, dtype=ct, device=q.device)
    lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
    if lq == 0 or lk == 0 or w == 0:
        return AttentionOutput(out.to(q.dtype), lse)
    num, idx = _expanded(index, b, h)
    # Elements held per query block: gathered keys and values plus the score tile.
    per_block = b * h * w * bn * (d + dv + 2 * bm)
    step = max(1, min(nqb, max_elements // max(1, per_block)))
    dev = q.device
    bi = torch.arange(b, device=dev)[:, None, None, None]
    hi = (torch.arange(h, device=dev) // (h // hk))[None, :, None, None]
    offs = torch.arange(bn, device=dev)
    slots = torch.arange(w, device=dev)
    for q0 in range(0, nqb, step):
        q1 = min(nqb, q0 + step)
        nc, r0, r1 = q1 - q0, q0 * bm, min(lq, q1 * bm)
        qc = torch.nn.functional.pad(q[:, :, r0:r1].to(ct), (0, 0, 0, nc * bm - (r1 - r0)))
        qc = qc.view(b, h, nc, bm, d)
        ids = idx[:, :, q0:q1].to(torch.int64)
        used = (slots < num[:, :, q0:q1, None]) & (ids >= 0) & (ids < nkb)
        pos = (ids.clamp(0, max(nkb - 1, 0))[..., None] * bn + offs).flatten(-2)  # (b, h, nc, w * bn)
        valid = used.repeat_interleave(bn, dim=-1) & (pos < lk)
        pos = pos.clamp_max(lk - 1)
        kg = k[bi, hi, pos].to(ct)  # (b, h, nc, w * bn, d)
        s = torch.matmul(qc, kg.transpose(-1, -2)) * scale  # (b, h, nc, bm, w * bn)
        if bias is not None:
            bg = bias[bi, hi, pos].to(ct)
            s = s + torch.where(bg <= MASKED_BIAS, float("-inf"), bg)[..., None, :]
        s = s.masked_fill(~valid[..., None, :], float("-inf"))
        m = s.amax(dim=-1)
        m_safe = torch.where(torch.isfinite(m), m, 0.0)
        p = torch.exp(s - m_safe[..., None])
        den = p.sum(dim=-1)
        o = torch.matmul(p, v[bi, hi, pos].to(ct))
        nonempty = den > 0
        o = torch.where(nonempty[..., None], o / den.clamp_min(1e-300)[..., None], 0.0)
        ls = torch.where(nonempty, m_safe + torch.log(den.clamp_min(1e-300)), float("-inf"))
        out[:, :, r0:r1] = o.reshape(b, h, nc * bm, dv)[:, :, : r1 - r0]
        lse[:, :, r0:r1] = ls.reshape(b, h, nc * bm)[:, :, : r1 - r0].float()
    return AttentionOutput(out.to(q.dtype), lse)


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> AttentionOutput:
    """The index expanded into a dense (B, H, seqlen_q, seqlen_k) key mask, fed to ``attention_ref``.

    Same arguments and outputs as :func:`block_sparse_attention`; ``upcast=True`` computes in float64 (the
    ground truth), ``upcast=False`` in q's dtype. Materialises every score: small shapes only.
    """
    check_qkv(q, k, v)
    check_bias(bias, k)
    _check_index(index, q, k)
    b, h = q.shape[:2]
    mask = index.key_mask().expand(b, h, index.seqlen_q, index.seqlen_k)
    if bias is not None:
        bias = torch.where(bias <= MASKED_BIAS, float("-inf"), bias)
    out, lse = attention_ref(q, k, v, bias, scale=scale, upcast=upcast, key_mask=mask)
    return AttentionOutput(out, lse)
