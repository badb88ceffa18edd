"""Sliding windows over the spatial axes of NCHW tensors, and their adjoint.

Convolution and pooling share one geometry: an output position (ho, wo) reads the input at
``(ho·s_h − p_top + i·d_h, wo·s_w − p_left + j·d_w)`` for kernel offsets (i, j). ``windows``
returns that as a strided view of shape ``(N, C, kh, kw, Ho, Wo)`` (no copy), and
``scatter_windows`` is its adjoint (col2im): it adds each window back where it came from.
Both loop only over the kh·kw kernel offsets, never over samples or output positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Kernel, stride, dilation and padding (top, left, bottom, right) of a 2-D window op."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    ceil_mode: bool = False

    def output_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Output size per axis: ⌊(n + p_b + p_e − d(k−1) − 1)/s⌋ + 1 (ceil in ceil_mode,
        dropping a last window that would start past the input and its leading pad)."""
        out = []
        for ax in range(2):
            n, k, s, d = in_hw[ax], self.kernel[ax], self.stride[ax], self.dilation[ax]
            begin, end = self.pads[ax], self.pads[ax + 2]
            span = n + begin + end - d * (k - 1) - 1
            if span < 0:
                raise ValueError(f"window of {d * (k - 1) + 1} does not fit an input of {n} (+ padding)")
            size = (-(-span // s) if self.ceil_mode else span // s) + 1
            if self.ceil_mode and (size - 1) * s >= n + begin:
                size -= 1
            out.append(size)
        return out[0], out[1]

    def padded_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Extent of the padded input that the windows read (may exceed or crop the end pad)."""
        out_hw = self.output_hw(in_hw)
        return tuple(  # type: ignore[return-value]
            max((out_hw[ax] - 1) * self.stride[ax] + self.dilation[ax] * (self.kernel[ax] - 1) + 1,
                in_hw[ax] + self.pads[ax])
            for ax in range(2)
        )


def pad_input(x: np.ndarray, geom: Geometry, value: float) -> np.ndarray:
    """Place x (N, C, H, W) into the padded frame that the windows read, filled with value."""
    n, c, h, w = x.shape
    hp, wp = geom.padded_hw((h, w))
    out = np.full((n, c, hp, wp), value, dtype=x.dtype)
    top, left = geom.pads[0], geom.pads[1]
    out[:, :, top:top + h, left:left + w] = x
    return out


def windows(padded: np.ndarray, geom: Geometry, out_hw: tuple[int, int]) -> np.ndarray:
    """Strided view (N, C, kh, kw, Ho, Wo) of a padded input: element [.., i, j, ho, wo] is
    padded[.., ho·s_h + i·d_h, wo·s_w + j·d_w]."""
    n, c = padded.shape[:2]
    sn, sc, sh, sw = padded.strides
    (kh, kw), (st_h, st_w), (d_h, d_w) = geom.kernel, geom.stride, geom.dilation
    return np.lib.stride_tricks.as_strided(
        padded,
        shape=(n, c, kh, kw, out_hw[0], out_hw[1]),
        strides=(sn, sc, sh * d_h, sw * d_w, sh * st_h, sw * st_w),
        writeable=False,
    )


def scatter_windows(contribution, geom: Geometry, in_hw: tuple[int, int],
                    lead_shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
    """Adjoint of ``windows(pad_input(·))`` (col2im): returns (*lead_shape, H, W).

    ``contribution(i, j)`` gives the (*lead_shape, Ho, Wo) values that the windows read at
    kernel offset (i, j); each is added back to the input position it was read from, and
    what falls on padding is dropped. Loops over the kh·kw offsets only, so a caller never
    has to materialise all the windows at once.
    """
    hp, wp = geom.padded_hw(in_hw)
    ho, wo = geom.output_hw(in_hw)
    out = np.zeros(tuple(lead_shape) + (hp, wp), dtype=dtype)
    (kh, kw), (st_h, st_w), (d_h, d_w) = geom.kernel, geom.stride, geom.dilation
    for i in range(kh):
        for j in range(kw):
            out[..., i * d_h:i * d_h + (ho - 1) * st_h + 1:st_h,
                j * d_w:j * d_w + (wo - 1) * st_w + 1:st_w] += contribution(i, j)
    top, left = geom.pads[0], geom.pads[1]
    return out[..., top:top + in_hw[0], left:left + in_hw[1]]
