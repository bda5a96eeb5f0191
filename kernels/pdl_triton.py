"""Programmatic dependent launch (Hopper and later), shared by every Triton kernel of a decode step.

A kernel launched with `launch_pdl` (kernels/_backend.py:pdl) may be scheduled while the kernel ahead of it on
the stream still runs: its CTAs get resident and wait in `pdl_enter` until that kernel has finished and its
memory is visible, so a step of ~20 small kernels a layer no longer pays each kernel's launch latency after
the previous one's end. Rules that keep this exact:
- `pdl_enter` is every such kernel's first statement: no load and no store before it (the previous kernel
  may still be writing what this one reads, or reading what it writes), and no CTA returns before it.
- It lets the next kernel launch only after this one's wait: at most two grids are in flight, and a kernel
  that waited cannot end before the one ahead of it, so "ended" stays transitive along the stream (a kernel
  may read what any earlier kernel wrote, as without PDL).
- Kernels launched without it (cuBLAS, torch) wait for the whole previous kernel as usual.
"""
import triton
import triton.language as tl


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
