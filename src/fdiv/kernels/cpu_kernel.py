r"""The CPU row kernel: the token-loss template in C++, built on first use, every built-in generator.

``csrc/token_rows.cpp`` runs the same template as the Triton kernel on x86 (and any CPU with a
C++17 compiler): per row, the scaled logits go into an L2-resident workspace, one ``exp`` per
element and row gives both log-normalisers, one pass evaluates the generator's pointwise forms
(the same families and constants as :mod:`fdiv.kernels.triton_kernel`, from
:meth:`fdiv.FDivergence.kernel_form`) with the zero-probability limits and contract 2, and the
softmax chain rule is written straight into the gradient in the input dtype. Math is float32
with ATen's vectorised SLEEF functions (AVX-512 or AVX2, by
``torch.backends.cpu.get_cpu_capability()``); row sums accumulate in float64. Threads: one
slice of rows per thread, ``torch.get_num_threads()`` of them.

**Build and cache.** The library is compiled once per (source, compiler flags, torch version,
CPU capability) with the system C++ compiler (``$CXX``, else ``c++``; three units in parallel, about 8.5 s on a 2-core machine) against
torch's headers, and cached in ``$FDIV_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/fdiv/kernels``, i.e. ``~/.cache/fdiv/kernels``); later processes load it in
milliseconds. Delete that folder to clear it. Without a compiler, or if the build fails, one
warning is printed and the torch paths (compiled / eager) run instead; ``FDIV_CPU_KERNEL=0``
disables the kernel.

Divergences without a kernel family (user generators, Rényi, Bhattacharyya) and float64 inputs
take the torch paths.

**Gradient buffers.** The ``[N, V]`` gradients the kernel writes are reused across calls
(:class:`GradientPool`): a buffer goes back to the pool when the last tensor on it is freed
(after the lm_head backward, or ``zero_grad``), and the next call of that size writes into pages
that are already mapped instead of page-faulting a fresh allocation (on a 2-core VM that fault
cost was as large as the kernel itself). Between calls the pool holds at most
:data:`POOL_BLOCKS` idle buffers; :func:`empty_cache` frees them, ``FDIV_GRAD_POOL=0`` disables it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

import torch

from ._forms import FORM_NAMES, kernel_scalars, resolve_form
from ._rowmath import needs_finite_form_grads

# The three entry points (_token_rows, _topk_rows, _ShardRows) are private cores on checked
# arguments, called by fdiv.token_loss / topk_token_loss / vocab_parallel_token_loss, which own
# the public, keyword-only boundary.
__all__ = ["available", "cache_dir", "empty_cache", "library_path", "pool_bytes", "supports", "usable"]

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "token_rows.cpp", _CSRC / "gemm_bf16.cpp")  # one library; parallel.h is included by both
_HEADERS = (_CSRC / "parallel.h",)
# Compilation units, built in parallel and linked into one library: token_rows.cpp in two halves
# (FDIV_PART: the dense rows / the top-k and shard rows; ~6 s and ~5 s here, 10 s as one unit), the GEMMs.
_UNITS = ((_SOURCES[0], "-DFDIV_PART=1"), (_SOURCES[0], "-DFDIV_PART=2"), (_SOURCES[1], None))
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}  # fmt: skip
_LOCK = threading.Lock()
_STATE: dict = {}


def enabled() -> bool:
    """False when ``FDIV_CPU_KERNEL=0``."""
    return os.environ.get("FDIV_CPU_KERNEL", "1") != "0"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FDIV_KERNEL_CACHE`` or ``$XDG_CACHE_HOME/fdiv/kernels``."""
    if os.environ.get("FDIV_KERNEL_CACHE"):
        return Path(os.environ["FDIV_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fdiv" / "kernels"


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "DEFAULT"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _compile_command(compiler: str, source: Path, define: str | None, output: Path) -> list[str]:
    include = Path(torch.__file__).parent / "include"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = _CAPABILITY_FLAGS.get(_capability(), [])
    return [
        compiler, "-O3", "-std=c++17", "-fPIC", "-fno-math-errno", *flags, *([define] if define else []),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{include}", "-c", str(source), "-o", str(output),
    ]  # fmt: skip


def _link_command(compiler: str, objects, output: Path) -> list[str]:
    lib = Path(torch.__file__).parent / "lib"
    return [compiler, "-shared", *map(str, objects), "-o", str(output), f"-L{lib}", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{lib}"]  # fmt: skip


def library_path(compiler: str | None = None) -> Path:
    """The cached library's path for this source, torch, compiler flags and CPU capability."""
    compiler = compiler or _compiler() or "c++"
    key = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        key.update(source.read_bytes())
    for source, define in _UNITS:
        key.update(" ".join(_compile_command(compiler, Path(source.name), define, Path("out"))).encode())
    key.update(" ".join(_link_command(compiler, [], Path("out"))).encode())
    key.update(torch.__version__.encode())
    return cache_dir() / f"token_rows-{_capability().lower()}-{key.hexdigest()[:16]}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = [Path(tmp) / f"unit{i}.o" for i in range(len(_UNITS))]
        jobs = [
            subprocess.Popen(_compile_command(compiler, source, define, obj), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for (source, define), obj in zip(_UNITS, objects)
        ]  # fmt: skip
        results = []
        for job in jobs:
            _, err = job.communicate()
            results.append((job.returncode, err))
        staged = Path(tmp) / path.name
        if all(code == 0 for code, _ in results):
            link = subprocess.run(_link_command(compiler, objects, staged), capture_output=True, text=True)
            results.append((link.returncode, link.stderr))
        for code, err in results:
            if code != 0:
                raise RuntimeError(err.strip()[-2000:] or f"{compiler} exited with {code}")
        os.replace(staged, path)  # atomic: a concurrent process sees no half-written library


def _bind(path: Path):
    lib = ctypes.CDLL(str(path))
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    dense = lib.fdiv_token_rows
    dense.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i32, i32, i32, i32, i32, i32,
                      i32, i32, i32, i32, ptr, i32]  # fmt: skip
    dense.restype = None
    topk = lib.fdiv_topk_rows
    topk.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i32, i32, i32, i32, i32, f32, ptr,
                     i32]  # fmt: skip
    topk.restype = None
    shard = lib.fdiv_shard_phase
    shard.argtypes = [i32, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32, i32, i32, i32, i32, i32, i32, i32, ptr,
                      ptr, ptr, ptr, ptr, i32]  # fmt: skip
    shard.restype = None
    bf16_supported = lib.fdiv_bf16_gemm_supported
    bf16_supported.argtypes, bf16_supported.restype = [], i32
    bf16_gemm = lib.fdiv_bf16_gemm
    bf16_gemm.argtypes, bf16_gemm.restype = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, i64, i32], None
    bf16_weight_grad = lib.fdiv_bf16_weight_grad
    bf16_weight_grad.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, i64, i32, i32]
    bf16_weight_grad.restype = None
    return types.SimpleNamespace(
        dense=dense, topk=topk, shard=shard, bf16_supported=bf16_supported,
        bf16_gemm=bf16_gemm, bf16_weight_grad=bf16_weight_grad,
    )  # fmt: skip


def _load():
    """The kernel's entry point, building it on first use; None (after one warning) if it cannot be built."""
    with _LOCK:
        if "fn" in _STATE:
            return _STATE["fn"]
        fn = None
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set $CXX, or install g++ / clang++)")
            path = library_path(compiler)
            if not path.exists():
                _build(compiler, path)
            fn = _bind(path)
        except Exception as error:  # no compiler, a failed build, an unloadable library: stay correct, lose speed
            warnings.warn(f"fdiv: the CPU row kernel is unavailable ({error}); using the torch paths", stacklevel=3)
        _STATE["fn"] = fn
        return fn


def available() -> bool:
    """Whether the kernel is enabled and built (builds it on the first call)."""
    return enabled() and sys.platform != "win32" and _load() is not None


def supports(divergence) -> bool:
    """Whether the kernel has forms for ``divergence`` (a :class:`fdiv.Divergence`)."""
    return resolve_form(divergence) is not None


def usable(divergence, device, *dtypes) -> bool:
    """Whether the kernel runs ``divergence`` on tensors of ``device`` with these dtypes: CPU,
    float32 / bf16 / fp16, a kernel family, enabled and built (builds it on the first call)."""
    return (
        torch.device(device).type == "cpu"
        and all(dtype in _DTYPE_CODES for dtype in dtypes)
        and supports(divergence)
        and available()
    )


POOL_BLOCKS = 4
_POOL_MIN_BYTES = 1 << 22  # smaller buffers come back from malloc's free lists without page faults


class GradientPool:
    """Gradient buffers handed out as tensors and taken back when nothing references them.

    Each block is an ``UntypedStorage`` the pool keeps one reference to; a block is idle when
    that is its only reference (``use_count == 1``: every tensor, view, autograd buffer or
    ``.grad`` on it is gone), so a buffer still in use is never handed out twice. A request takes
    the smallest idle block of at least its size and at most 1/8 above it (variable sequence
    lengths reuse one block); otherwise a new block is allocated and, past ``POOL_BLOCKS``,
    the oldest idle block is dropped. Requests under 4 MiB bypass the pool.
    """

    def __init__(self, max_blocks: int = POOL_BLOCKS):
        self.max_blocks = max_blocks
        self._blocks: list = []
        self._lock = threading.Lock()

    @staticmethod
    def _idle(block) -> bool:
        return torch._C._storage_Use_Count(block._cdata) == 1

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``."""
        nbytes = dtype.itemsize
        for size in shape:
            nbytes *= size
        if nbytes < _POOL_MIN_BYTES or os.environ.get("FDIV_GRAD_POOL", "1") == "0":
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [b for b in self._blocks if nbytes <= b.nbytes() <= nbytes + nbytes // 8 and self._idle(b)]
            if fits:
                block = min(fits, key=lambda b: b.nbytes())
                self._blocks.remove(block)
            else:
                block = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
                idle = [b for b in self._blocks if self._idle(b)]
                while len(self._blocks) >= self.max_blocks and idle:
                    self._blocks.remove(idle.pop(0))
            self._blocks.append(block)  # most recently used last
            return torch.empty(0, dtype=dtype).set_(block, 0, tuple(shape))

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes() for b in self._blocks if self._idle(b))

    def clear(self) -> None:
        with self._lock:
            self._blocks = [b for b in self._blocks if not self._idle(b)]


_POOL = GradientPool()


def pooled_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor from the pool (:class:`GradientPool`): a workspace that lives for
    one call and is reused, already mapped, by the next."""
    return _POOL.empty(shape, dtype)


def empty_cache() -> None:
    """Free the idle gradient buffers the CPU kernel keeps for reuse (:class:`GradientPool`)."""
    _POOL.clear()


def pool_bytes() -> int:
    """Bytes of idle gradient buffers the CPU kernel holds for its next calls."""
    return _POOL.idle_bytes()


def _entry(name: str):
    lib = _load()
    if lib is None:
        raise RuntimeError("the CPU row kernel is unavailable; check fdiv.kernels.cpu_kernel.available() first")
    return getattr(lib, name)


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Family(types.SimpleNamespace):
    """The kernel arguments of a divergence: ``form`` (family id), ``swap``, ``standardize``,
    ``guard`` (its forms can overflow on finite inputs) and ``scalars`` (float32 ``[11]``:
    ``1/T, f(0), f'(inf), slope, c0..c5, row_slope``), resolved once per call by :func:`_family`."""


def _family(divergence, inv_temperature: float) -> _Family:
    name, scalars, swap, standardize = kernel_scalars(divergence, inv_temperature, "CPU row kernel")
    return _Family(
        form=FORM_NAMES.index(name),
        swap=int(swap),
        standardize=int(standardize),
        guard=int(needs_finite_form_grads(divergence, False)),
        scalars=torch.tensor(scalars, dtype=torch.float32),
    )


def _token_rows(
    divergence,
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_weights: torch.Tensor,
    inv_temperature: float,
    *,
    teacher_grad: bool,
    student_grad: bool = True,
    out_student: torch.Tensor | None = None,
    out_teacher: torch.Tensor | None = None,
    ranges: torch.Tensor | None = None,
):
    """Row divergences ``D(softmax(teacher/T) || softmax(student/T))`` and weighted logit gradients.

    The contract of :func:`fdiv.kernels.triton_kernel.triton_token_rows` (its private core, on
    checked arguments): ``student`` / ``teacher`` ``[N, V]`` CPU float32 / bf16 / fp16 with a
    unit last stride; ``row_weights`` ``[N]``. Returns ``(rows, grad_student, grad_teacher)``:
    ``rows`` ``[N]`` float32, the unweighted row divergence clamped at 0 (0 where ``w == 0``;
    those rows' logits are not read); the gradients ``w / T * dD_row/dlogits`` in each input's
    dtype (written into ``out_*`` when given, unit last stride, in ``out_*``'s dtype of the three;
    ``out_student`` may lie over ``student``'s own rows, in another dtype too (a bf16 view of the first
    half of each float32 row): each row is read into the workspace before its gradient is written),
    None where not asked for. ``ranges`` (float32 ``[N, 4]``, contiguous), when
    given, receives each row's (max, min) of ``student / T`` then ``teacher / T`` as the kernel loads
    them (rows of weight 0 are loaded for this alone): the by-product that replaces the input scan of
    ``check_finite``.
    """
    fn = _entry("dense")
    student, teacher = _rows_2d(student), _rows_2d(teacher)
    n, vocab = student.shape
    family = _family(divergence, inv_temperature)
    weights = row_weights.detach().to(dtype=torch.float32).contiguous()
    rows = torch.empty(n, dtype=torch.float32)
    grad_s = (_POOL.empty(student.shape, student.dtype) if out_student is None else out_student) if student_grad else None
    grad_t = (_POOL.empty(teacher.shape, teacher.dtype) if out_teacher is None else out_teacher) if teacher_grad else None
    if n == 0:
        return rows, grad_s, grad_t
    gs = grad_s if grad_s is not None else student
    gt = grad_t if grad_t is not None else teacher
    fn(
        student.data_ptr(), teacher.data_ptr(), gs.data_ptr(), gt.data_ptr(), rows.data_ptr(), weights.data_ptr(),
        None if ranges is None else ranges.data_ptr(), n, vocab,
        student.stride(0), teacher.stride(0), gs.stride(0), gt.stride(0),
        _DTYPE_CODES[student.dtype], _DTYPE_CODES[teacher.dtype], _DTYPE_CODES[gs.dtype], _DTYPE_CODES[gt.dtype],
        int(grad_s is not None), int(grad_t is not None),
        family.form, family.swap, family.standardize, family.guard, family.scalars.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return rows, grad_s, grad_t


def _topk_rows(
    divergence,
    student: torch.Tensor,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail: torch.Tensor,
    row_weights: torch.Tensor,
    inv_temperature: float,
    *,
    noise: float | None,
):
    """Row divergences against a top-k teacher with a tail bucket (``tail="bucket"``) and the weighted gradient.

    The math of :func:`fdiv.kernels.sparse.sparse_chunk` (``k + 1`` outcomes: the top-k ids and
    the rest, the student's tail mass summed directly over the entries outside the top-k, never
    ``1 - sum``), one exp per vocabulary entry. ``student`` ``[N, V]`` CPU float32 / bf16 / fp16;
    ``indices`` ``[N, k]`` ids in ``[0, V)`` (a row with an id outside gives NaN, no memory
    access outside the row); ``teacher_logprobs`` ``[N, k]``; ``teacher_tail`` ``[N]`` the
    teacher's tail log-mass; ``noise``: where not None, a teacher tail at or below ``noise``
    counts as empty in rows whose student tail is empty (:func:`fdiv.kernels.sparse.teacher_tail`).
    Returns ``(rows, grad_student)``: ``[N]`` float32 unweighted, clamped at 0 (0 where ``w == 0``),
    and ``w / T * dD_row/dlogits`` in the student's dtype.
    """
    fn = _entry("topk")
    student = _rows_2d(student)
    n, vocab = student.shape
    k = indices.shape[-1]
    family = _family(divergence, inv_temperature)
    ids = indices.to(torch.int64).contiguous()
    logprobs = teacher_logprobs.to(torch.float32).contiguous()
    tails = teacher_tail.reshape(n).to(torch.float32).contiguous()
    weights = row_weights.detach().to(dtype=torch.float32).contiguous()
    rows = torch.empty(n, dtype=torch.float32)
    grad = _POOL.empty(student.shape, student.dtype)
    if n == 0:
        return rows, grad
    fn(
        student.data_ptr(), ids.data_ptr(), logprobs.data_ptr(), tails.data_ptr(), grad.data_ptr(), rows.data_ptr(),
        weights.data_ptr(), n, vocab, k, student.stride(0), grad.stride(0), _DTYPE_CODES[student.dtype],
        family.form, family.swap, family.standardize, int(noise is not None),
        float(noise if noise is not None else 0.0), family.scalars.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return rows, grad


class _ShardRows:
    """The token-loss template on vocabulary shards, split at its three all-reduces.

    For :mod:`fdiv.kernels.vocab_parallel`: each method is one pass over the ``[n, V_r]`` shards
    of this rank (CPU float32 / bf16 / fp16, unit last stride); the caller all-reduces between
    them. ``local_maxima`` -> MAX; ``local_sum_exp(max)`` -> SUM; ``partial_sums(max, log_sum)``
    returns ``[3, n]`` (row value, ``sum grad_b``, ``sum grad_a`` of this shard) and keeps the
    pointwise gradients in float32 buffers -> SUM; ``gradients(max, log_sum, sums)`` applies the
    softmax chain rule in place and returns them (``[n, V_r]`` float32, ``1/T`` included, no row
    weight). Every pass re-reads the shards; no ``[n, V_r]`` temporary besides the gradients.
    """

    def __init__(self, divergence, student, teacher, inv_temperature, *, masked, student_grad, teacher_grad):
        self._fn = _entry("shard")
        self.student, self.teacher = _rows_2d(student), _rows_2d(teacher)
        self.n, self.vocab = self.student.shape
        self._family = _family(divergence, inv_temperature)
        self.masked = bool(masked)
        shape = (self.n, self.vocab)
        self.grad_student = _POOL.empty(shape, torch.float32) if student_grad else None
        self.grad_teacher = _POOL.empty(shape, torch.float32) if teacher_grad else None

    def _run(self, phase, out, maxima=None, log_sum=None, sums=None):
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        f = self._family
        self._fn(
            phase, self.student.data_ptr(), self.teacher.data_ptr(), ptr(self.grad_student), ptr(self.grad_teacher),
            self.n, self.vocab, self.student.stride(0), self.teacher.stride(0), _DTYPE_CODES[self.student.dtype],
            _DTYPE_CODES[self.teacher.dtype], int(self.grad_student is not None), int(self.grad_teacher is not None),
            int(self.masked), f.form, f.swap, f.standardize, f.guard, f.scalars.data_ptr(), ptr(maxima), ptr(log_sum),
            ptr(sums), ptr(out), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def local_maxima(self) -> torch.Tensor:
        return self._run(1, torch.empty(2, self.n, dtype=torch.float32))

    def local_sum_exp(self, maxima: torch.Tensor) -> torch.Tensor:
        return self._run(2, torch.empty(2, self.n, dtype=torch.float32), maxima=maxima.float().contiguous())

    def partial_sums(self, maxima: torch.Tensor, log_sum: torch.Tensor) -> torch.Tensor:
        self._maxima, self._log_sum = maxima.float().contiguous(), log_sum.float().contiguous()
        return self._run(3, torch.empty(3, self.n, dtype=torch.float32), maxima=self._maxima, log_sum=self._log_sum)

    def gradients(self, sums: torch.Tensor):
        self._run(4, None, maxima=self._maxima, log_sum=self._log_sum, sums=sums.float().contiguous())
        return self.grad_student, self.grad_teacher
