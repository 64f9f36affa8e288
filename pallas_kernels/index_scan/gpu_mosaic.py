"""Index scan on Hopper through Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`): the
tensor-core scan of gpu_triton_mma.py without the deprecated Triton backend.

The same arithmetic as gpu_triton_mma.py (its module docstring bounds the rounding): the
signed codes (|c| <= 127, exact in bfloat16) times q * sigma in three bfloat16 parts
hi + mid + lo, one float32 accumulator per part on the tensor cores (`plgpu.wgmma`, the
codes in registers, the parts in shared memory), the parts summed in float32 in the order
hi + mid + lo, then est_g = scale * (qmu_g + step_p * dot_g). One program (CTA) per
(batch row, K/V head, chunk of `tiles` consecutive tiles of P = 128 keys): the group's
query parts copied to shared memory once, the chunk's code and step tiles streamed
through `plgpu.emit_pipeline` (TMA, `max_concurrent_steps` in flight), each tile's
estimates written back by TMA (`plgpu.kernel`: JAX 0.11.2's pallas_call found no Mosaic
GPU lowering for a grid of BlockSpecs).

Layouts (Lane semantics): the packed codes [P, D'] uint8 are loaded in the
`WGMMA_UPCAST_2X` layout, unpacked with shifts and masks, converted to bfloat16 and
relaid to the WGMMA layout for the A operand; the accumulators [P, N] (N = Gp rounded up
to 8) are in the WGMMA layout; head g's column is taken by a masked row sum (adding
zeros: exact but for the sign of a zero) into the WGMMA row layout [P], where the step,
the key positions and the middle-key mask live, and written as row g of the [Gp, P]
output tile.

Needs a Hopper GPU (compute capability 9.0), S divisible by 128, Gp <= 8 a power of two
and a packed width D' = D * bits / 8 in (32, 64, 128); NotImplementedError otherwise
(it is never a default, so no fallback: name another implementation there).

Measured on an H200 (jax 0.11.2, 2026-12-04, `python -m experiments.bench.scan_bench`):
the reference's -inf pattern and estimates to 4e-7 relative, the same top-C candidates on
every head, and the index tests' slack bound (tests/pallas_kernels/index_scan); 0.84-0.88x
the Triton tensor-core scan's speed (22.8 / 93.0 / 549 µs at 8K / 128K / 1M keys against
20.1 / 81.2 / 459), nearly flat in the pipeline depth and tiles per program: the per-tile
work (unpacking, six small N = 8 wgmmas, the column sums), not the copies, bounds it. Not a
default yet (api.py).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.index_scan.gpu_triton_mma import PARTS, split_parts
from pallas_kernels.index_scan.reference import levels

P = 128            # keys per tile: two 64-row wgmma blocks of one warpgroup
N_COLS = 8         # the smallest wgmma N


def _swizzle(width_bytes: int) -> int:
  for s in (128, 64, 32):
    if width_bytes % s == 0:
      return s
  raise NotImplementedError(f"a row of {width_bytes} bytes: no TMA swizzle fits")


def _transforms(width: int, dtype) -> tuple:
  bits = jnp.dtype(dtype).itemsize * 8
  sw = _swizzle(width * bits // 8)
  return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))


def _tile(qt_smem, packed_smem, step_smem, est_smem, codes_smem, *, qmu, length,
          tile_start, scale, bits, group, anchor, window):
  # qt_smem     [PARTS * NG, N, D']  bfloat16 part t of q * sigma for nibble group n at
  #                                  t * NG + n, row g = head g (rows >= G: 0)
  # packed_smem [P, D']    uint8     codes of P consecutive keys
  # step_smem   [P]        float32
  # est_smem    [Gp, P]    float32   output tile (-inf: not a middle key, or padding row)
  # qmu         Gp float32 scalars (q . mu); length: the row's kv length (scalar)
  # codes_smem  [NG, P, D'] bfloat16 scratch for the A operand (None: A from registers)
  cast = plgpu.layout_cast
  gp = est_smem.shape[0]
  ng = 8 // bits
  mask, lv = (1 << bits) - 1, levels(bits)
  # the cast is the load's layout hint (Lane semantics)
  x = cast(packed_smem[...], plgpu.Layout.WGMMA_UPCAST_2X)
  codes = []
  for n in range(ng):
    # masks only (Mosaic GPU has no shifts of 8-bit values); the field's value times
    # 2^(n bits) is exact in bfloat16 (integers <= 256), and so is the rescale
    c = (x & (mask << (n * bits))).astype(jnp.bfloat16)
    if n:
      c = c * jnp.bfloat16(2.0 ** (-n * bits))
    c = c - jnp.bfloat16(lv)
    c = cast(c, plgpu.Layout.WGMMA)
    if codes_smem is None:
      codes.append(c)
    else:
      codes_smem[n] = c
      codes.append(codes_smem.at[n])
  if codes_smem is not None:
    plgpu.commit_smem()        # the tensor cores read what the threads wrote

  def scope(*accs):           # every part's products issued before the first wait
    for t, acc_ref in enumerate(accs):
      for n in range(ng):
        plgpu.wgmma(acc_ref, codes[n], plgpu.transpose_ref(qt_smem.at[t * ng + n], (1, 0)))
    hi, mid, lo = (acc_ref[...] for acc_ref in accs)
    return hi + mid + lo

  dot = pl.run_scoped(scope, *[plgpu.ACC((P, N_COLS), jnp.float32)] * PARTS)
  row = plgpu.Layout.WGMMA.reduce(1)
  step = cast(step_smem[...], row)
  pos = tile_start + cast(jax.lax.broadcasted_iota(jnp.int32, (P,), 0), row)
  middle = (pos >= anchor) & (pos <= length - 1 - window)
  cols = cast(jax.lax.broadcasted_iota(jnp.int32, (P, N_COLS), 1), plgpu.Layout.WGMMA)
  neg_inf = cast(jnp.full((P,), -jnp.inf, jnp.float32), row)
  for g in range(gp):
    if g >= group:
      est_smem[g] = neg_inf
      continue
    dot_g = jnp.sum(jnp.where(cols == g, dot, 0.0), axis=1)
    est = scale * (qmu[g] + step * dot_g)
    est_smem[g] = jnp.where(middle, est, neg_inf)


def index_scan(qs, qmu, packed, step, kv_lengths, *, scale, bits, group, anchor, window,
               interpret=False, tiles=None, max_concurrent_steps=4,
               a_operand="registers"):
  """Mosaic GPU index scan; semantics of reference.index_scan up to gpu_triton_mma.py's
  rounding. tiles: key tiles per program (None: up to 8, fewer while that leaves under
  4 programs per multiprocessor: measured on an H200, SmolLM2's 8K shape ran 23.5 µs at
  4 tiles against 35.5 at 8, the 128K shape alike from 4 to 32). NotImplementedError
  where it can't run (module docstring; interpret=True
  too: the GPU interpreter of the CPU machines' JAX 0.10.2 has no layouts, no transposed
  refs and no predicated copies, all of which this kernel uses). a_operand: "registers" (the codes go to
  the tensor cores from registers) or "smem" (through a shared-memory tile)."""
  if a_operand not in ("registers", "smem"):
    raise ValueError(f"a_operand={a_operand!r}: expected 'registers' or 'smem'.")
  if interpret or jax.default_backend() != "gpu":
    raise NotImplementedError("the Mosaic GPU index scan needs a Hopper GPU (no interpret "
                              "mode).")
  cc = getattr(jax.devices()[0], "compute_capability", None)
  if cc is not None and not str(cc).startswith("9"):
    raise NotImplementedError(f"compute capability {cc}: the Mosaic GPU scan uses Hopper "
                              "wgmma (9.0).")
  b, hkv, gp, d = qs.shape
  s, dp = packed.shape[2], packed.shape[3]
  if s % P or gp > N_COLS or gp & (gp - 1) or dp not in (32, 64, 128) or 8 % bits:
    raise NotImplementedError(
        f"S={s}, Gp={gp}, packed width {dp}, bits {bits}: the Mosaic GPU scan needs S "
        f"divisible by {P}, a power-of-two Gp <= {N_COLS} and a packed width of 32, 64 or "
        "128 bytes.")
  ng = 8 // bits
  n_tiles = s // P
  if tiles is None:
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    tiles = 8
    while tiles > 1 and b * hkv * n_tiles // tiles < 4 * sms:
      tiles //= 2
  tiles = max(1, min(int(tiles), n_tiles))
  while n_tiles % tiles:
    tiles -= 1
  parts = split_parts(qs)                                               # [B, K, Gp, D]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, N_COLS - gp), (0, 0)))
  # [B, K, PARTS * NG, N, D'] : part t, nibble group n (channels n D' .. (n + 1) D' - 1)
  qt = jnp.stack([pad(p)[..., n * dp:(n + 1) * dp] for p in parts for n in range(ng)],
                 axis=2)
  tile_kw = dict(scale=float(scale), bits=int(bits), group=int(group), anchor=int(anchor),
                 window=int(window))
  qt_transforms = _transforms(dp, jnp.bfloat16)
  packed_transforms = _transforms(dp, jnp.uint8)

  def kernel(qt_gmem, packed_gmem, step_gmem, qmu_gmem, len_gmem, est_gmem):
    bk, chunk = jax.lax.axis_index("bk"), jax.lax.axis_index("chunk")
    bi, ki = bk // hkv, bk % hkv
    length = len_gmem[bi]
    qmu_g = [qmu_gmem[bi, ki, g] for g in range(gp)]

    def scoped(qt_smem, barrier, codes_smem):
      plgpu.copy_gmem_to_smem(qt_gmem.at[bi, ki], qt_smem, barrier)
      plgpu.barrier_wait(barrier)

      def body(idx, packed_smem, step_smem, est_smem):
        (t,) = idx
        _tile(qt_smem, packed_smem, step_smem, est_smem, codes_smem, qmu=qmu_g,
              length=length, tile_start=(chunk * tiles + t) * P, **tile_kw)

      plgpu.emit_pipeline(
          body, grid=(tiles,),
          in_specs=[plgpu.BlockSpec((P, dp), lambda t: (chunk * tiles + t, 0),
                                    transforms=packed_transforms),
                    plgpu.BlockSpec((P,), lambda t: (chunk * tiles + t,))],
          out_specs=[plgpu.BlockSpec((gp, P), lambda t: (0, chunk * tiles + t))],
          max_concurrent_steps=int(max_concurrent_steps),
      )(packed_gmem.at[bi, ki], step_gmem.at[bi, ki], est_gmem.at[bi, ki])

    codes_scratch = (None if a_operand == "registers" else
                     plgpu.SMEM((ng, P, dp), jnp.bfloat16, transforms=qt_transforms))
    pl.run_scoped(scoped, plgpu.SMEM(qt.shape[2:], jnp.bfloat16, transforms=qt_transforms),
                  plgpu.Barrier(),
                  codes_scratch)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((b, hkv, gp, s), jnp.float32),
      grid=(b * hkv, n_tiles // tiles), grid_names=("bk", "chunk"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
  )(qt, packed, step.astype(jnp.float32), qmu.astype(jnp.float32),
    jnp.asarray(kv_lengths, jnp.int32).reshape(b))
