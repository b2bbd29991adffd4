"""Compiles a kernel for sm_90 on any machine (no GPU needed) and prints what a test checks,
as JSON: the wgmma shapes in its PTX, register spills, serialized wgmma, warps.

Run in a process of its own without TRITON_INTERPRET (under the interpreter, which the CPU
tests set, Gluon's library functions cannot be compiled, nor anything for a GPU); `run_compile`
does:

    python -m tests.helpers.sm90_compile vit_attention|pingpong
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TOKENS = 1025  # InternViT's 448-px tiles: 16 full 64-row blocks and a 16-row tail


def descriptor(rows: int, columns: int) -> str:
    from triton.experimental.gluon import language as gl

    layout = gl.NVMMASharedLayout.get_default_for([rows, columns], gl.bfloat16)
    return f"tensordesc<bf16[{rows}, {columns}],{layout!r}>"


def run_compile(kernel: str) -> dict[str, object]:
    """`compile_vit_attention()` or `compile_pingpong()` in a child process without the
    interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.sm90_compile", kernel],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_vit_attention() -> dict[str, object]:
    """The Triton ViT attention kernel as the model launches it for 1025-token tiles, bf16."""
    from triton.compiler import ASTSource

    from ocula.kernels import vit_attention as kernel

    block_m, block_n, num_warps, num_stages = kernel._launch_config(TOKENS, 64)
    signature = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    signature["qk_scale"] = "fp32"
    for tensor in ("q", "k", "v", "o"):
        signature.update({f"stride_{tensor}_{dim}": "i32" for dim in ("tile", "token", "head")})
    constants = {
        "TOKENS": TOKENS, "HEAD_DIM": 64, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "TAIL_M": kernel.tail_block(TOKENS, block_m), "TAIL_N": kernel.tail_block(TOKENS, block_n),
        "INPUT_PRECISION": "tf32",
    }  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = ASTSource(kernel._vit_attention_kernel, signature, constants)
    return compiled_report(source, {"num_warps": num_warps, "num_stages": num_stages})


def compile_pingpong() -> dict[str, object]:
    """The fc1 GEMM with a bias and the activation table, at 5 stages."""
    from ocula.kernels import pingpong_linear as kernel

    signature = {
        "x_desc": descriptor(kernel.BLOCK_M, kernel.BLOCK_K),
        "w_desc": descriptor(kernel.BLOCK_N, kernel.BLOCK_K),
        "out_desc": descriptor(kernel.BLOCK_M, kernel.BLOCK_N), "bias_ptr": "*bf16",
        "table_ptr": "*i16", "N": "i32", "num_tiles": "i32", "num_pid_n": "i32", "k_steps": "i32",
        "STAGES_": "constexpr", "HAS_BIAS": "constexpr", "HAS_TABLE": "constexpr",
    }  # fmt: skip
    from triton.experimental.gluon._runtime import GluonASTSource

    constants = {"STAGES_": kernel.STAGES, "HAS_BIAS": True, "HAS_TABLE": True}
    source = GluonASTSource(kernel.pingpong_linear_kernel, signature, constants)
    return compiled_report(source, {"num_warps": 4, "maxnreg": kernel.KERNEL_MAX_REGISTERS})


def compiled_report(source: object, options: dict[str, int]) -> dict[str, object]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile

    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)
    return {
        "wgmma_shapes": sorted(set(shapes)),
        **ptxas_report(ptx),
        "warps": compiled.metadata.num_warps,
        "shared_bytes": compiled.metadata.shared,
    }


def ptxas_report(ptx: str) -> dict[str, object]:
    """What the ptxas shipped with Triton says of the kernel for sm_90a: spill stores plus loads
    in bytes, and whether it serialized the wgmma instructions (it does when other instructions
    may read an accumulator while its wgmma is in flight, which undoes every overlap)."""
    import triton.backends.nvidia

    ptxas = Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        report = subprocess.run(
            [str(ptxas), "-arch=sm_90a", "-v", str(source), "-o", str(Path(folder) / "k.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    text = report.stderr + report.stdout
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return {
        "spill_bytes": sum(int(n) for n in spills) if spills else -1,
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in text,
    }


if __name__ == "__main__":
    compile_kernel = {"vit_attention": compile_vit_attention, "pingpong": compile_pingpong}
    print(json.dumps(compile_kernel[sys.argv[1]]()))
