"""torch.compile backends for the tests, named as train.py's --compile_backend=compile_backends:NAME (the tests put
tests/ on PYTHONPATH): inductor that counts its graphs and their calls, and compilers that fail where a real one
can fail (at the first call, at a recompile without grad, in the backward)."""
import atexit
import json
import os

import torch

counts = {"graphs": 0, "calls": 0}  # graphs compiled by inductor, and calls of them (each one ran compiled code)


@atexit.register
def report():
    if os.environ.get("COMPILE_COUNTS"):
        with open(os.environ["COMPILE_COUNTS"], "w") as f:
            json.dump(counts, f)


def counted(compiled):
    counts["graphs"] += 1

    def run(*args):
        counts["calls"] += 1
        return compiled(*args)
    return run


def counting(gm, example_inputs):
    """inductor, as torch.compile's default backend runs it."""
    from torch._inductor.compile_fx import compile_fx

    return counted(compile_fx(gm, example_inputs))


def failing(gm, example_inputs):
    raise RuntimeError("this compiler always fails (tests/compile_backends.py)")


def failing_without_grad(gm, example_inputs):
    """aot_eager (no code generation: cheap) for graphs compiled with grad, a failure for the first one without:
    the recompile at the first eval."""
    if not torch.is_grad_enabled():
        raise RuntimeError("this compiler fails on graphs without grad (tests/compile_backends.py)")
    from torch._dynamo.backends.debugging import aot_eager

    return counted(aot_eager(gm, example_inputs))


def failing_backward(gm, example_inputs):
    """The forward compiles (AOTAutograd, no code generation); the backward's compile, which AOTAutograd makes at the
    first backward, fails."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_compiler(gm, example_inputs):
        raise RuntimeError("this compiler fails on backward graphs (tests/compile_backends.py)")

    return counted(aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=backward_compiler)(gm, example_inputs))
