"""Triton source of the GPU kernels (launched by `kernels.py`, which says when and why): the generator's, and one
for the encoders' batch norm + activation + residual steps.

Every size and stride is a run-time argument, so each kernel compiles a handful of times in all (per dtype and a
few flags), not per layer, batch size or precision the way torch.compile's static-shape graphs did. Sizes are kept
out of Triton's value specialisation (`do_not_specialize`); strides are not, so a stride of 1 is seen and the
loads along it are vectorised. Arithmetic is in fp32, rounded once on the store.

Importing this module needs Triton; `kernels.py` imports it only on CUDA, and everything else runs without it.
"""
import triton
import triton.language as tl

SQRT2: tl.constexpr = tl.constexpr(1.4142135623730951)


@triton.jit(do_not_specialize=["n_pix", "n_ch", "n_out", "P1", "P2", "P3"])
def styled_activation_kernel(y_ptr, out_ptr, noise_ptr, noise_weight_ptr, bias_ptr, n_pix, n_ch, n_out, P1, P2, P3,
                             ys0, ys1, ys2, ys3, ysc, os0, os1, os2, os3, osc, ns0, ns1, ns2, ns3, nsb,
                             NOISE_PER_SAMPLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                             EVEN_C: tl.constexpr):
    """out = leaky_relu(y + noise_weight * noise + bias, 0.2) * sqrt(2) over [pixels, channels] tiles.

    Pixels: up to four dims (P0 = n_pix / (P1 P2 P3), P1, P2, P3), e.g. (1, 1, H, W), or (H, row parity, W,
    column parity) for an upsampling layer's phases; channels: b * n_out + o, one stride per tensor (all the
    layouts here merge batch and channels). Noise has one channel and is shared by the batch unless
    NOISE_PER_SAMPLE. EVEN_C: the channel blocks tile n_ch exactly, so only pixels are masked."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i3 = p % P3
    rest = p // P3
    i2 = rest % P2
    rest = rest // P2
    i1 = rest % P1
    i0 = rest // P1
    pix_mask = p < n_pix
    ch_mask = ch < n_ch
    if EVEN_C:  # no mask along the channels: Triton then vectorises the loads and stores along them
        mask = pix_mask[:, None]
    else:
        mask = pix_mask[:, None] & ch_mask[None, :]
    y_pix = i0 * ys0 + i1 * ys1 + i2 * ys2 + i3 * ys3
    y = tl.load(y_ptr + y_pix[:, None] + ch[None, :] * ysc, mask=mask, other=0.0).to(tl.float32)
    noise_pix = i0 * ns0 + i1 * ns1 + i2 * ns2 + i3 * ns3
    if NOISE_PER_SAMPLE:
        noise = tl.load(noise_ptr + noise_pix[:, None] + (ch // n_out)[None, :] * nsb, mask=mask, other=0.0)
    else:
        noise = tl.load(noise_ptr + noise_pix, mask=pix_mask, other=0.0)[:, None]
    noise_weight = tl.load(noise_weight_ptr).to(tl.float32)
    if EVEN_C:
        bias = tl.load(bias_ptr + ch % n_out).to(tl.float32)
    else:
        bias = tl.load(bias_ptr + ch % n_out, mask=ch_mask, other=0.0).to(tl.float32)
    v = y + noise_weight * noise.to(tl.float32) + bias[None, :]
    v = tl.where(v > 0, v, v * 0.2) * SQRT2
    out_pix = i0 * os0 + i1 * os1 + i2 * os2 + i3 * os3
    tl.store(out_ptr + out_pix[:, None] + ch[None, :] * osc, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tap(k: tl.constexpr, a0, a1, a2, a3):
    """a_k of the blur's four taps (k a compile-time index)."""
    if k == 0:
        return a0
    if k == 1:
        return a1
    if k == 2:
        return a2
    return a3


@triton.jit(do_not_specialize=["n_pix", "n_out", "width", "a0", "a1", "a2", "a3"])
def blurred_activation_kernel(t_ptr, out_ptr, noise_ptr, noise_weight_ptr, bias_ptr, n_pix, n_out, width,
                              tsb, tsr, tsc, tso, tsy, tsx, osb, oso, osy, osp, osx, osq, nsb, nsy, nsp, nsx, nsq,
                              a0, a1, a2, a3, ACTIVATE: tl.constexpr, NOISE_PER_SAMPLE: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr):
    """An upsampling layer's transposed convolution, blurred, then (if ACTIVATE) noise + bias + activation.

    t: the transposed convolution in phase form [B, 2, 2, O, H + 1, W + 1] (row parity, column parity); out: the
    layer's output as [B, O, H, 2, W, 2] (row, row parity, column, column parity); noise the same with one channel.
    Along each axis the blur (four taps a0..a3) reads the interleaved signal t[2n - 1 .. 2n + 2] for output 2n and
    t[2n .. 2n + 3] for 2n + 1, i.e. (parity, index) (1, n - 1), (0, n), (1, n), (0, n + 1), (1, n + 1): five
    positions per axis (`generator.blur_phase_terms`), index -1 being a zero. Separable: each of the five rows is
    blurred along the columns, then the rows are combined. One sample per program (axis 1: sample and channel block),
    so that the channels, innermost in every layout here, are read and written in whole runs."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    blocks = tl.cdiv(n_out, BLOCK_C)
    b = tl.program_id(1) // blocks
    o = (tl.program_id(1) % blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = p // width
    m = p % width
    pix_ok = p < n_pix
    if EVEN_C:
        mask = pix_ok[:, None]
    else:
        mask = pix_ok[:, None] & (o < n_out)[None, :]
    base = t_ptr + b * tsb + o[None, :] * tso
    acc00 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc01 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc10 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc11 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(5):
        row = n + ((i + 1) // 2 - 1)
        row_mask = mask
        if i == 0:
            row_mask = mask & (row >= 0)[:, None]
        h0 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        h1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for j in tl.static_range(5):
            col = m + ((j + 1) // 2 - 1)
            ok = row_mask
            if j == 0:
                ok = row_mask & (col >= 0)[:, None]
            at = ((i + 1) % 2) * tsr + ((j + 1) % 2) * tsc + row * tsy + col * tsx
            v = tl.load(base + at[:, None], mask=ok, other=0.0).to(tl.float32)
            if j < 4:
                h0 += _tap(j, a0, a1, a2, a3) * v
            if j > 0:
                h1 += _tap(j - 1, a0, a1, a2, a3) * v
        if i < 4:
            acc00 += _tap(i, a0, a1, a2, a3) * h0
            acc01 += _tap(i, a0, a1, a2, a3) * h1
        if i > 0:
            acc10 += _tap(i - 1, a0, a1, a2, a3) * h0
            acc11 += _tap(i - 1, a0, a1, a2, a3) * h1
    out_base = out_ptr + b * osb + o[None, :] * oso + (n * osy + m * osx)[:, None]
    noise_base = noise_ptr + n * nsy + m * nsx
    if NOISE_PER_SAMPLE:
        noise_base += b * nsb
    noise_weight = tl.load(noise_weight_ptr).to(tl.float32)  # (without ACTIVATE: any valid pointers, unused)
    if EVEN_C:
        bias = tl.load(bias_ptr + o).to(tl.float32)[None, :]
    else:
        bias = tl.load(bias_ptr + o, mask=o < n_out, other=0.0).to(tl.float32)[None, :]
    for phase in tl.static_range(4):  # (row parity, column parity) = divmod(phase, 2)
        v = acc00
        if phase == 1:
            v = acc01
        if phase == 2:
            v = acc10
        if phase == 3:
            v = acc11
        at = (phase // 2) * osp + (phase % 2) * osq
        if ACTIVATE:
            noise = tl.load(noise_base + (phase // 2) * nsp + (phase % 2) * nsq, mask=pix_ok, other=0.0)
            v = v + noise_weight * noise.to(tl.float32)[:, None] + bias
            v = tl.where(v > 0, v, v * 0.2) * SQRT2
        tl.store(out_base + at, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["scale", "n_out", "n_in", "n_taps", "n_phases"])
def modulated_weight_kernel(w_ptr, style_ptr, delta_ptr, tap_ptr, out_ptr, scale, n_out, n_in, n_taps, n_phases,
                            wso, wsc, wsy, wsx, ssb, ssc, dsb, dso, dsc, dsy, dsx, osb, osj, ost, osc,
                            K: tl.constexpr, KK_BLOCK: tl.constexpr, T_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                            HAS_DELTA: tl.constexpr, DEMODULATE: tl.constexpr):
    """Per-sample weights of one (sample b, output channel o) per program, in `_modulated`'s order:
    w = W * scale * (1 + delta) * style, times rsqrt(sum over taps and inputs of w^2 + 1e-8) when DEMODULATE.

    Output rows phase * n_out + o, one per phase; each has n_taps output taps, tap t being the tap
    tap_ptr[phase, t] of the k x k kernel (-1: a zero), so one kernel writes the plain [B, O, k, k, C] weights, the
    16-tap padded ones and the transposed convolution's phase kernels alike. All phases' taps are one tile, so the
    demodulation is computed once per output channel: the transposed form's four phases share it (one program per
    phase summed it four times; H100, one generator pass graphed, bf16 batch 8 1.077 -> 1.052 ms/image). delta is
    [B|1, O, C] (dsy = dsx = 0) or [B|1, O, C, k, k]."""
    pid = tl.program_id(0)
    b = pid // n_out
    o = pid % n_out
    demod = 1.0
    if DEMODULATE:
        s = tl.arange(0, KK_BLOCK)
        sy = s // K
        sx = s % K
        acc = tl.zeros((KK_BLOCK, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, n_in, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = (s < K * K)[:, None] & (c < n_in)[None, :]
            w = tl.load(w_ptr + o * wso + c[None, :] * wsc + (sy * wsy + sx * wsx)[:, None], mask=m,
                        other=0.0).to(tl.float32) * scale
            if HAS_DELTA:
                d = tl.load(delta_ptr + b * dsb + o * dso + c[None, :] * dsc + (sy * dsy + sx * dsx)[:, None],
                            mask=m, other=0.0).to(tl.float32)
                w = w * (1 + d)
            st = tl.load(style_ptr + b * ssb + c * ssc, mask=c < n_in, other=0.0).to(tl.float32)
            w = w * st[None, :]
            acc += w * w
        demod = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) + 1e-8)
    t = tl.arange(0, T_BLOCK)  # phase * n_taps + tap
    t_ok = t < n_phases * n_taps
    src = tl.load(tap_ptr + t, mask=t_ok, other=-1)
    src_ok = src >= 0
    src = tl.maximum(src, 0)
    sy = src // K
    sx = src % K
    out_rows = b * osb + ((t // n_taps) * n_out + o) * osj + (t % n_taps) * ost
    for c0 in range(0, n_in, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = (c < n_in)[None, :]
        m = src_ok[:, None] & c_ok
        w = tl.load(w_ptr + o * wso + c[None, :] * wsc + (sy * wsy + sx * wsx)[:, None], mask=m,
                    other=0.0).to(tl.float32) * scale
        if HAS_DELTA:
            d = tl.load(delta_ptr + b * dsb + o * dso + c[None, :] * dsc + (sy * dsy + sx * dsx)[:, None], mask=m,
                        other=0.0).to(tl.float32)
            w = w * (1 + d)
        st = tl.load(style_ptr + b * ssb + c * ssc, mask=c < n_in, other=0.0).to(tl.float32)
        w = w * st[None, :] * demod
        tl.store(out_ptr + out_rows[:, None] + c[None, :] * osc, w.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & c_ok)


@triton.jit(do_not_specialize=["scale", "n_out", "n_in", "n_rows", "n_cols", "n_used"])
def block_diagonal_kernel(w_ptr, style_ptr, delta_ptr, out_ptr, scale, n_out, n_in, n_rows, n_cols, n_used,
                          wso, wsc, ssb, ssc, dsb, dso, dsc, osr, osn,
                          HAS_DELTA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """toRGB's block-diagonal weight [B*C, n_cols]: row b*C + c, column b*O + o holds
    W[o, c] * scale * (1 + delta[b, o, c]) * style[b, c]; other samples' blocks and the padding columns are 0."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = r // n_in
    c = r % n_in
    o = n % n_out
    inside = (r < n_rows)[:, None] & (n < n_cols)[None, :]
    m = inside & (b[:, None] == (n // n_out)[None, :]) & (n < n_used)[None, :]
    w = tl.load(w_ptr + o[None, :] * wso + c[:, None] * wsc, mask=m, other=0.0).to(tl.float32) * scale
    if HAS_DELTA:
        d = tl.load(delta_ptr + b[:, None] * dsb + o[None, :] * dso + c[:, None] * dsc, mask=m,
                    other=0.0).to(tl.float32)
        w = w * (1 + d)
    st = tl.load(style_ptr + b * ssb + c * ssc, mask=r < n_rows, other=0.0).to(tl.float32)
    w = w * st[:, None]
    tl.store(out_ptr + r[:, None] * osr + n[None, :] * osn, w.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _phase_tap(parity, d: tl.constexpr, t00, t01, t02, t10, t11, t12):
    """The upsampling tap for output phase `parity` (0 or 1) at source offset d - 1: taps[parity][d]."""
    even = t00
    odd = t10
    if d == 1:
        even = t01
        odd = t11
    if d == 2:
        even = t02
        odd = t12
    return tl.where(parity == 0, even, odd)


@triton.jit(do_not_specialize=["height", "width", "t00", "t01", "t02", "t10", "t11", "t12"])
def rgb_output_kernel(image_ptr, out_ptr, bias_ptr, skip_ptr, height, width,
                      is0, is1, is2, is3, xs0, xs1, xs2, xs3, ks0, ks1, ks2, ks3,
                      t00, t01, t02, t10, t11, t12, HAS_SKIP: tl.constexpr, BLOCK_W: tl.constexpr):
    """image = out + bias (+ the skip image upsampled 2x: y[2n + p] = sum_d skip[n + d - 1] * taps[p][d] along each
    axis, zero padded). One image row of one channel of one sample per program row; all tensors [B, 3, H, W] with
    any strides (skip [B, 3, H/2, W/2])."""
    row = tl.program_id(0)
    y = row % height
    c = (row // height) % 3
    b = row // (3 * height)
    x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    x_ok = x < width
    v = tl.load(out_ptr + b * xs0 + c * xs1 + y * xs2 + x * xs3, mask=x_ok, other=0.0).to(tl.float32)
    v += tl.load(bias_ptr + c).to(tl.float32)
    if HAS_SKIP:
        half_h = height // 2
        half_w = width // 2
        ny = y // 2
        py = y % 2
        nx = x // 2
        px = x % 2
        base = skip_ptr + b * ks0 + c * ks1
        for d in tl.static_range(3):
            ty = _phase_tap(py, d, t00, t01, t02, t10, t11, t12)
            sy = ny + d - 1
            row_ok = (sy >= 0) & (sy < half_h)
            for e in tl.static_range(3):
                tx = _phase_tap(px, e, t00, t01, t02, t10, t11, t12)
                sx = nx + e - 1
                ok = x_ok & row_ok & (sx >= 0) & (sx < half_w)
                s = tl.load(base + sy * ks2 + sx * ks3, mask=ok, other=0.0).to(tl.float32)
                v += ty * tx * s
    tl.store(image_ptr + b * is0 + c * is1 + y * is2 + x * is3, v.to(image_ptr.dtype.element_ty), mask=x_ok)


@triton.jit(do_not_specialize=["n_pix", "n_ch", "hw", "width"])
def channel_epilogue_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, gate_ptr, res_ptr, res_scale_ptr, res_shift_ptr,
                            slope_ptr, n_pix, n_ch, hw, width, rs0, rs1, rs2, rsc,
                            HAS_GATE: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The encoders' step after a convolution, in one pass: out = act((x * scale + shift) * gate + residual).

    x, out: channels-last [N, C, H, W] (pixel p = (n H + h) W + w, channels contiguous); scale, shift [C] fp32 (an
    inference batch norm); gate [N, C] (squeeze-and-excitation) if HAS_GATE. RESIDUAL: 0 none, 1 added as is,
    2 through its own batch norm (r * res_scale + res_shift); any strides (rs0..rs2 over N, H, W; rsc over C), so a
    subsampled view is read in place. ACT: 0 none, 1 ReLU, 2 PReLU with slope [C]."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < n_pix
    c_mask = c < n_ch
    mask = p_mask[:, None] & c_mask[None, :]
    offsets = p[:, None] * n_ch + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    v = x * scale[None, :] + shift[None, :]
    n = p // hw
    if HAS_GATE:
        gate = tl.load(gate_ptr + n[:, None] * n_ch + c[None, :], mask=mask, other=0.0).to(tl.float32)
        v = v * gate
    if RESIDUAL > 0:
        rest = p % hw
        r_pix = n * rs0 + (rest // width) * rs1 + (rest % width) * rs2
        r = tl.load(res_ptr + r_pix[:, None] + c[None, :] * rsc, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 2:
            r_scale = tl.load(res_scale_ptr + c, mask=c_mask, other=0.0)
            r_shift = tl.load(res_shift_ptr + c, mask=c_mask, other=0.0)
            r = r * r_scale[None, :] + r_shift[None, :]
        v = v + r
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    if ACT == 2:
        slope = tl.load(slope_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        v = tl.where(v > 0, v, v * slope[None, :])
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)
