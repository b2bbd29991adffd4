"""Where the engine process's start goes: its imports, the CUDA context, then the model, its
graphs and the warm-up request under cProfile, in this one process (what
`ocula.server.engine_process` does before it tells the front it is ready).

    python -m benchmarks.profile_engine_start --checkpoint DIR [--server_args=--enable_multimodal]

Run it in a fresh process: the import times are the point. A first run on a machine also
pays Triton's compilations (its cache is in ~/.triton); a second shows the warm start.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()

import argparse  # noqa: E402  the clock starts before any import
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import shlex  # noqa: E402

MARKS: list[tuple[str, float]] = []


def mark(what: str) -> None:
    MARKS.append((what, round(time.monotonic() - STARTED, 3)))
    print(f"{MARKS[-1][1]:8.3f} s  {what}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--server_args",
        default="",
        help='more server flags, one string, given with "=": --server_args="--enable_multimodal"',
    )
    parser.add_argument("--top", type=int, default=40, help="rows of each cProfile table")
    args = parser.parse_args()

    import torch

    mark("import torch")
    import transformers  # noqa: F401

    mark("import transformers")
    from ocula.server import engine_process  # noqa: F401  everything the engine imports

    mark("import the engine's modules")
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        mark("CUDA context")

    from ocula.cli_args import parse_config
    from ocula.distributed.parallel_group import SINGLE_RANK
    from ocula.engine.engine_core import EngineCore
    from ocula.engine.model_setup import resolve_model
    from ocula.engine.warm_up_request import warm_up_engine
    from ocula.server.args import ServerArgs
    from ocula.utils.device import set_host_threads

    flags = ["--model_dir", args.checkpoint, *shlex.split(args.server_args)]
    server_args = parse_config(ServerArgs, flags)
    profile = cProfile.Profile()
    profile.enable()
    setup = resolve_model(server_args)
    set_host_threads(setup.device, server_args.ranks_per_node)
    mark("model folder resolved")
    core = EngineCore(server_args, setup, SINGLE_RANK)
    mark("engine built (model, KV pool, graphs)")
    warm_up_engine(core, setup.model_config, with_image=server_args.enable_multimodal)
    mark("warm-up request")
    profile.disable()
    for order in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(args.top)
        print(text.getvalue())
    print("marks:", MARKS)


if __name__ == "__main__":
    main()
