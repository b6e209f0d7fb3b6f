"""How the packed products launch: programmatic dependent launch (pdl_supported, launch_options),
the arrival counter that K-split programs share (last_to_arrive, also the decode attention's),
tile depths that fit K and its groups (block_k), and compiling a kernel for a GPU on a machine
without one (compile_for).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def last_to_arrive(lock, programs: tl.constexpr):
    """Called by each of `programs` programs sharing the counter `lock` once its partial results
    are stored: whether it is the last to get here, which then merges them (reading them past L1,
    .cg) and resets the counter to zero. The barrier makes every thread's stores precede the count."""
    tl.debug_barrier()
    return tl.atomic_add(lock, 1, sem="acq_rel") == programs - 1


def pdl_supported(device: torch.device | str) -> bool:
    """Whether kernels on `device` can be launched as programmatic dependent launches: CUDA GPUs
    of compute capability 9.0 (Hopper) or later, with a Triton that has the griddepcontrol calls;
    never under Triton's interpreter."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 \
        and hasattr(tl.extra.cuda, "gdc_wait")


def launch_options(pdl: bool) -> dict:
    """Triton launch options for a kernel written with a PDL switch (gdc_wait before it reads what
    earlier kernels wrote): the launch attribute only when asked, as the interpreter knows none."""
    return {"launch_pdl": True} if pdl else {}


def block_k(K: int, group_size: int, act_order: bool, preferred: int, chunked: bool = False) -> int:
    """A tile depth that divides K and is a multiple of 32. Without act-order, a tile of the
    dequantizing kernels lies within one group; the GEMV (`chunked`) reads groups as chunks of
    32 inputs, so its tiles may cut across groups that are whole chunks."""
    def fits(bk: int) -> bool:
        if K % bk:
            return False
        return act_order or (group_size % 32 == 0 if chunked else group_size % bk == 0)
    bk = preferred
    while bk > 32 and not fits(bk):
        bk //= 2
    if not fits(bk):
        raise ValueError(f"packed kernels need input features and group size divisible by 32 "
                         f"(K={K}, group={group_size})")
    return bk


def compile_for(kernel, arch: int, pointers: dict[str, str], scalars: dict[str, str], constants: dict,
                source_type=None, **options):
    """`kernel` compiled for CUDA compute capability `arch` (×10) on any machine, to read the code
    it becomes (benchmarks/kernel_asm.py): its runtime arguments, in order, of the Triton types
    given (pointers, then scalars), every pointer and integer 16-byte aligned; `constants` all of
    its constexpr parameters; `source_type` the front end (default Triton's ASTSource; Gluon's for
    Gluon kernels); `options` Triton's (num_warps, num_stages, launch_pdl)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source_type = source_type or ASTSource
    signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
    names = list(signature)
    aligned = [i for i, name in enumerate(names) if name in pointers or signature[name] in ("i32", "i64", "u32")]
    source = source_type(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
