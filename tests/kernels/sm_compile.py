"""Compile the Triton kernels for a GPU this machine does not have (sm_80, sm_90a), with the
exact specialization their launchers produce, and read ptxas' resource report.

How (triton 3.9 internals, guarded by `available()`):
1. The kernel modules (r1vl_kernels.logits, terms, hidden) are imported with TRITON_INTERPRET
   off, so their kernels are JITFunctions.
2. For one launcher call, each kernel global of those modules is swapped for a recorder: the
   launcher runs on device="meta" tensors at real shapes, and `kernel[grid](*args, **kw)`
   records the call.
3. The recorded call goes through the binder JITFunction.run uses
   (create_function_from_signature + _pack_args): divisibility-16 hints, i64 for ints
   >= 2**31, ints equal to 1 as constants, exactly as a launch on the GPU would.
4. triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) needs no driver; the
   PTX goes through the ptxas bundled with the wheel for registers, stack and spills.
It must run in a process that imported triton and r1vl_kernels without TRITON_INTERPRET:
triton.language's own jit functions (tl.sum, tl.max, ...) and the package's kernels are
interpreter functions otherwise, and no kernel compiles. The tests therefore run it as a
subprocess.

Run as a script for the whole table: `python tests/kernels/sm_compile.py`; with
`--json CASE...` (cases of sm_launches.CASES) it prints one JSON row per launch.
"""
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

KERNEL_MODULES = ("logits", "terms", "hidden")
TARGETS = {"sm_90a": 90, "sm_80": 80}
# Per-block shared memory a kernel may ask for (bytes): sm_86 / sm_89 allow 99 KB, which
# is what a launch configured for compute capability 8.x must fit; sm_90 allows 227 KB.
SHARED_LIMIT = {90: 227 * 1024, 80: 99 * 1024}


@dataclasses.dataclass
class Resources:
    kernel: str
    variant: str
    target: str
    registers: int
    stack: int          # bytes of stack frame per thread
    spill_stores: int   # bytes
    spill_loads: int    # bytes
    shared: int         # bytes of shared memory per block
    num_warps: int
    vector_load: int    # bytes of the widest vector global load in the PTX (16: full; 0: none)


def available() -> str:
    """'' when the Triton internals used here exist, else the reason they do not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton internals moved ({exc}); this check is written for triton 3.9"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__}: JITFunction._pack_args is gone; written for 3.9"
    for name in ("ptxas", "ptxas-blackwell"):
        if not os.path.exists(_ptxas(name)):
            return f"triton {triton.__version__} ships no {name} in its nvidia backend"
    return ""


def _ptxas(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@contextlib.contextmanager
def _no_interpreter():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


class Launches:
    """The kernel modules' launches for one target, recorded, not run."""

    def __init__(self, capability: int):
        from triton.runtime.jit import JITFunction
        self.capability = capability
        self.calls = []
        with _no_interpreter():
            self.modules = {name: importlib.import_module(f"r1vl_kernels.{name}") for name in KERNEL_MODULES}
        self.kernels = [(module, attr) for module in self.modules.values() for attr, value in vars(module).items()
                        if attr.endswith("_kernel") and callable(value)]
        interpreted = [attr for module, attr in self.kernels if not isinstance(getattr(module, attr), JITFunction)]
        if interpreted:
            raise RuntimeError(f"r1vl_kernels was imported under TRITON_INTERPRET: {interpreted} are not JITFunctions")

    def run(self, module: str, launcher: str, *args, **kwargs):
        """Call a launcher on meta tensors; returns the launches it made."""
        start = len(self.calls)
        with _no_interpreter(), self._recording():
            getattr(self.modules[module], launcher)(*args, **kwargs)
        return self.calls[start:]

    @contextlib.contextmanager
    def _recording(self):
        """The kernels swapped for recorders, and the GPU capability the launchers read for
        this target's, while one launcher runs (several targets share the modules)."""
        saved = [(module, attr, getattr(module, attr)) for module, attr in self.kernels]
        saved += [(module, "capability", module.capability) for module in self.modules.values()
                  if hasattr(module, "capability")]
        for module, attr, value in saved:
            if attr == "capability":
                module.capability = lambda device, cc=self.capability: (cc // 10, cc % 10)
            else:
                setattr(module, attr, _Recorder(value, self.calls))
        try:
            yield
        finally:
            for module, attr, value in saved:
                setattr(module, attr, value)


class _Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.fn, grid, args, kwargs))


def compile_launch(launch, capability: int, variant: str) -> Resources:
    """Compile one recorded launch for sm_<capability> and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, _grid, args, kwargs = launch
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    with _no_interpreter():  # triton.language's builtins also read TRITON_INTERPRET at call time
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    gpu_name = "sm_90a" if capability == 90 else f"sm_{capability}"
    registers, stack, spill_st, spill_ld = _ptxas_report(kernel.asm["ptx"], gpu_name, capability)
    return Resources(fn.__name__, variant, gpu_name, registers, stack, spill_st, spill_ld,
                     kernel.metadata.shared, kernel.metadata.num_warps, _vector_load(kernel.asm["ptx"]))


def _vector_load(ptx: str) -> int:
    sizes = [int(vec) * int(bits) // 8 for vec, bits in re.findall(r"ld\.global[.\w]*?\.v(\d)\.[bfsu](\d+) ", ptx)]
    return max(sizes, default=0)


def _ptxas_report(ptx: str, gpu_name: str, capability: int):
    exe = _ptxas("ptxas-blackwell" if capability >= 90 else "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([exe, "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    stack, st, ld = map(int, re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return registers, stack, st, ld


def table(rows) -> str:
    lines = ["| kernel | variant | target | registers | spills (st/ld B) | stack B | shared KB | warps | vector load B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.variant} | {r.target} | {r.registers} | {r.spill_stores}/{r.spill_loads} "
                     f"| {r.stack} | {r.shared / 1024:.1f} | {r.num_warps} | {r.vector_load} |")
    return "\n".join(lines)


def main(argv):
    import sm_launches
    reason = available()
    if reason:
        sys.exit(reason)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET (see the module docstring)")
    if argv[:1] == ["--json"]:
        by_target = {}
        for cc, case in (json.loads(arg) for arg in argv[1:]):
            launches = by_target.setdefault(cc, Launches(cc))
            for launch in sm_launches.record(launches, case):
                res = compile_launch(launch, cc, case)
                row = dataclasses.asdict(res) | {"capability": cc,
                                                 "budget": sm_launches.register_budget(launches, res, cc)}
                print(json.dumps(row), flush=True)
        return
    rows = []
    for cc in TARGETS.values():
        for variant, launches in sm_launches.all_launches(Launches(cc)):
            for launch in launches:
                rows.append(compile_launch(launch, cc, variant))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
