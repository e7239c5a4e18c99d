"""The vendor driver APIs under GpuExecutor (gpu_executor.py): one small adapter per GPU kind, so that
everything above them (launch planning, argument packing, graph buckets, index checks, memory
planning) is one code.

    cuda  cuda-python's `cuda.bindings.driver` (the extra `cuda`)
    hip   hip-python's `hip.hip` (the extra `hip`; ROCm's HIP runtime, libamdhip64.so)

Both bindings return a tuple (error, results...) from every call; `Driver.call` checks the error
and returns the results. An adapter's `CALLS` maps each operation to its driver function, with
the same arguments in both APIs (cuMemcpyHtoDAsync(dst, src, bytes, stream) and
hipMemcpyHtoDAsync(...) alike); the few calls that differ (device query, stream creation, graph
instantiation, opting in to large shared memory) are methods of the adapter.

The cuda adapter has run on an NVIDIA H200 (cuda-bindings 13.3, driver 580; benchmarks/gpu_check.py);
the hip adapter has not met a device. Tests without a GPU check both tables against the installed
bindings and the host side through a recording driver.
"""

from __future__ import annotations

import ctypes
import time

from llmirc.errors import LlmircError

from .gpu_program import GpuUnavailable

# operation -> argument list (as both APIs take them); CALLS maps each to the driver function
OPERATIONS = {
    "alloc": "(bytes) -> address", "free": "(address)", "memset_d8": "(address, byte, bytes)",
    "htod": "(dst, src, bytes)", "htod_async": "(dst, src, bytes, stream)", "dtoh_async": "(dst, src, bytes, stream)",
    "dtod_async": "(dst, src, bytes, stream)",
    "synchronize": "(stream)", "mem_info": "() -> (free, total)", "load_module": "(image) -> module",
    "get_function": "(module, name) -> function",
    "launch": "(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra)",
    "begin_capture": "(stream, mode)", "end_capture": "(stream) -> graph", "graph_launch": "(graph_exec, stream)",
    "destroy_graph": "(graph)", "destroy_graph_exec": "(graph_exec)", "unload_module": "(module)",
    "destroy_stream": "(stream)",
}


class Driver:
    """One GPU kind's driver API; subclasses set `kind`, `CALLS` and the differing calls.
    `open(ordinal)` must come first: it raises GpuUnavailable (one line) when the host cannot
    run this kind."""

    kind = ""
    CALLS: dict[str, str] = {}
    OTHER: tuple[str, ...] = ()  # the other driver functions the adapter calls
    ERROR_NAME = ""
    OUT_OF_MEMORY = "?"

    def __init__(self):
        self.api = None
        self.device: dict = {}

    def call(self, op: str, *args):
        """The driver function of `op` (or a function name) called: its results, or LlmircError
        naming the driver's error."""
        fn = getattr(self.api, self.CALLS.get(op, op))
        out = fn(*args)
        err, rest = out[0], out[1:]
        if err != self.success:
            raise LlmircError(f"{self.kind.upper()} {fn.__name__} failed: {self.error_name(err)}")
        return rest[0] if len(rest) == 1 else rest

    def error_name(self, err) -> str:
        name = getattr(self.api, self.ERROR_NAME)(err)[1]  # (status, name) in both APIs
        return name.decode() if isinstance(name, bytes) else str(err)

    def alloc(self, n: int) -> int:
        """A device allocation of `n` bytes; GpuUnavailable when the device has too little memory for it."""
        try:
            return int(self.call("alloc", max(1, n)))
        except LlmircError as e:
            if not str(e).endswith(self.OUT_OF_MEMORY):
                raise
            raise GpuUnavailable(f"{self.kind}: too little memory for {n} bytes ({e})") from None

    def load(self, image: bytes, symbol: str, shared: int, what: str) -> tuple:
        """(module, function) of the kernel `symbol` of a code object (cubin, PTX, hsaco); the
        caller unloads the module (`unload_module`). GpuUnavailable naming `what` when the driver
        refuses the image."""
        try:
            module = self.call("load_module", image)
        except LlmircError as e:
            raise GpuUnavailable(f"{self.kind}: cannot load kernel {what}: {e}") from None
        try:
            fn = self.call("get_function", module, symbol.encode())
            self.opt_in_shared(fn, shared)
        except BaseException:
            self.call("unload_module", module)
            raise
        return module, fn

    def launch(self, fn, grid: tuple[int, int, int], threads: int, shared: int, stream, params,
               pdl: bool = False) -> None:
        """One launch; `params` a ctypes array of void* to the argument values (gpu_program.pack);
        `pdl`: with programmatic dependent launch (CudaDriver only; targets/triton/pdl.py)."""
        if pdl:
            raise LlmircError(f"{self.kind}: programmatic dependent launch is a CUDA feature")
        self.call("launch", fn, *grid, threads, 1, 1, shared, stream, ctypes.addressof(params), 0)

    def copy_bandwidth(self, nbytes: int = 512 << 20, repeat: int = 10) -> float:
        """Bytes/s of device-to-device copies of `nbytes` (bytes read + written, the HBM figure GPU
        benchmarks quote), timed on the host around `repeat` copies after one untimed; the open
        device needs 2 x nbytes free. LlmircError naming the driver's error otherwise."""
        stream, buffers = self.create_stream(), []
        try:
            buffers += [self.alloc(nbytes)]
            buffers += [self.alloc(nbytes)]
            src, dst = buffers
            self.call("memset_d8", src, 1, nbytes)
            self.call("dtod_async", dst, src, nbytes, stream)
            self.call("synchronize", stream)
            t0 = time.perf_counter()
            for _ in range(repeat):
                self.call("dtod_async", dst, src, nbytes, stream)
            self.call("synchronize", stream)
            return 2 * nbytes * repeat / (time.perf_counter() - t0)
        finally:
            for ptr in buffers:
                self.call("free", ptr)
            self.call("destroy_stream", stream)

    def capture(self, stream, record) -> object:
        """An executable graph of what `record()` launches on `stream` (the caller destroys it:
        `destroy_graph_exec`; the captured graph itself goes once instantiated). When `record()`
        raises, the capture is ended, its graph destroyed and `record`'s error raised."""
        self.call("begin_capture", stream, self.capture_mode)
        try:
            record()
        except BaseException:
            try:  # (a failed launch invalidates a CUDA capture: ending it fails too, and says less)
                self.call("destroy_graph", self.call("end_capture", stream))
            except LlmircError:
                pass
            raise
        graph = self.call("end_capture", stream)
        try:
            return self.instantiate(graph)
        finally:
            self.call("destroy_graph", graph)


class CudaDriver(Driver):
    kind = "cuda"
    CALLS = {"alloc": "cuMemAlloc", "free": "cuMemFree", "memset_d8": "cuMemsetD8", "htod": "cuMemcpyHtoD",
             "htod_async": "cuMemcpyHtoDAsync", "dtoh_async": "cuMemcpyDtoHAsync", "dtod_async": "cuMemcpyDtoDAsync",
             "synchronize": "cuStreamSynchronize",
             "mem_info": "cuMemGetInfo", "load_module": "cuModuleLoadData", "get_function": "cuModuleGetFunction",
             "launch": "cuLaunchKernel", "begin_capture": "cuStreamBeginCapture", "end_capture": "cuStreamEndCapture",
             "graph_launch": "cuGraphLaunch", "destroy_graph": "cuGraphDestroy",
             "destroy_graph_exec": "cuGraphExecDestroy", "unload_module": "cuModuleUnload",
             "destroy_stream": "cuStreamDestroy"}
    OTHER = ("cuInit", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetAttribute", "cuDeviceGetName",
             "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuDriverGetVersion", "cuStreamCreate",
             "cuGraphInstantiate", "cuFuncSetAttribute", "cuLaunchKernelEx")
    ERROR_NAME = "cuGetErrorName"
    OUT_OF_MEMORY = "CUDA_ERROR_OUT_OF_MEMORY"  # the error name of an allocation the device cannot hold
    MAX_STATIC_SHARED = 48 << 10  # above this a kernel must opt in to dynamic shared memory

    def __init__(self):
        super().__init__()
        self._pdl_configs = {}  # launch configurations with the PDL attribute, by grid, block, shared memory, stream

    @staticmethod
    def import_api():
        try:
            from cuda.bindings import driver
        except ImportError:
            raise GpuUnavailable("cuda: cuda-python is not installed (pip install 'llmirc[cuda]')") from None
        return driver

    def open(self, ordinal: int = 0) -> dict:
        """The device: name, arch (sm_XY), capability (major, minor), free and total bytes, driver
        version; makes its primary context current."""
        self.api = d = self.import_api()
        self.success = d.CUresult.CUDA_SUCCESS
        self.capture_mode = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        try:
            self.call("cuInit", 0)
        except Exception as e:  # noqa: BLE001  (a missing libcuda raises cuda.pathfinder's own error type)
            why = "libcuda.so.1 not found" if "NotFound" in type(e).__name__ else str(e).splitlines()[0][:120]
            raise GpuUnavailable(f"cuda: no NVIDIA driver ({why})") from None
        count = self.call("cuDeviceGetCount")
        if count <= ordinal:
            raise GpuUnavailable(f"cuda: no CUDA device {ordinal} ({count} found)")
        dev = self.call("cuDeviceGet", ordinal)
        attr = d.CUdevice_attribute
        major = self.call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        minor = self.call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        name = self.call("cuDeviceGetName", 256, dev)
        self.context = self.call("cuDevicePrimaryCtxRetain", dev)
        self.make_current()
        free, total = self.call("mem_info")
        self.device = {"name": name.split(b"\0")[0].decode(errors="replace"), "arch": f"sm_{major}{minor}",
                       "capability": (major, minor), "free": int(free), "total": int(total),
                       "driver_version": self.call("cuDriverGetVersion")}
        return self.device

    def make_current(self) -> None:
        self.call("cuCtxSetCurrent", self.context)

    def launch(self, fn, grid: tuple[int, int, int], threads: int, shared: int, stream, params,
               pdl: bool = False) -> None:
        if not pdl:
            return super().launch(fn, grid, threads, shared, stream, params)
        key = (*grid, threads, shared, int(stream))  # (building a config costs ~10 us of Python)
        config = self._pdl_configs.get(key)
        if config is None:
            d = self.api
            attr = d.CUlaunchAttribute()
            attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            config = d.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = grid
            config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
            config.sharedMemBytes, config.hStream = shared, stream
            config.attrs, config.numAttrs = [attr], 1
            self._pdl_configs[key] = config
        self.call("cuLaunchKernelEx", config, fn, ctypes.addressof(params), 0)

    def create_stream(self):
        return self.call("cuStreamCreate", 0)

    def instantiate(self, graph):
        return self.call("cuGraphInstantiate", graph, 0)

    def opt_in_shared(self, fn, shared: int) -> None:
        if shared > self.MAX_STATIC_SHARED:
            self.call("cuFuncSetAttribute", fn,
                      self.api.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)

    def pick_target(self, targets: list, name: str | None = None) -> tuple[dict, bool]:
        return pick_cuda_target(targets, self.device["capability"], name)


class HipDriver(Driver):
    kind = "hip"
    CALLS = {"alloc": "hipMalloc", "free": "hipFree", "memset_d8": "hipMemsetD8", "htod": "hipMemcpyHtoD",
             "htod_async": "hipMemcpyHtoDAsync", "dtoh_async": "hipMemcpyDtoHAsync", "dtod_async": "hipMemcpyDtoDAsync",
             "synchronize": "hipStreamSynchronize", "mem_info": "hipMemGetInfo", "load_module": "hipModuleLoadData",
             "get_function": "hipModuleGetFunction", "launch": "hipModuleLaunchKernel",
             "begin_capture": "hipStreamBeginCapture", "end_capture": "hipStreamEndCapture",
             "graph_launch": "hipGraphLaunch", "destroy_graph": "hipGraphDestroy",
             "destroy_graph_exec": "hipGraphExecDestroy", "unload_module": "hipModuleUnload",
             "destroy_stream": "hipStreamDestroy"}
    OTHER = ("hipInit", "hipGetDeviceCount", "hipGetDeviceProperties", "hipSetDevice", "hipDriverGetVersion",
             "hipStreamCreate", "hipGraphInstantiate")
    ERROR_NAME = "hipGetErrorName"
    OUT_OF_MEMORY = "hipErrorOutOfMemory"  # the error name of an allocation the device cannot hold

    @staticmethod
    def import_api():
        try:
            from hip import hip
        except ImportError:
            raise GpuUnavailable("hip: hip-python is not installed (pip install 'llmirc[hip]')") from None
        return hip

    def open(self, ordinal: int = 0) -> dict:
        """The device: name, arch (gfxNNN, from gcnArchName without its feature flags), free and
        total bytes, driver version; makes it current for this thread."""
        self.api = h = self.import_api()
        self.success = h.hipError_t.hipSuccess
        self.capture_mode = h.hipStreamCaptureMode.hipStreamCaptureModeThreadLocal
        self.ordinal = ordinal
        try:
            self.call("hipInit", 0)
        except RuntimeError as e:  # hip-python raises RuntimeError when it cannot dlopen the runtime
            why = "libamdhip64.so not found" if "libamdhip64" in str(e) else str(e).splitlines()[0][:120]
            raise GpuUnavailable(f"hip: no AMD driver ({why})") from None
        except LlmircError as e:
            raise GpuUnavailable(f"hip: no AMD driver ({e})") from None
        count = self.call("hipGetDeviceCount")
        if count <= ordinal:
            raise GpuUnavailable(f"hip: no HIP device {ordinal} ({count} found)")
        self.make_current()
        props = self.call("hipGetDeviceProperties", ordinal)
        free, total = self.call("mem_info")
        self.device = {"name": _text(props.name), "arch": _text(props.gcnArchName).split(":")[0],
                       "free": int(free), "total": int(total), "driver_version": self.call("hipDriverGetVersion")}
        return self.device

    def make_current(self) -> None:
        self.call("hipSetDevice", self.ordinal)

    def create_stream(self):
        return self.call("hipStreamCreate")

    def instantiate(self, graph):
        return self.call("hipGraphInstantiate", graph, 0)[0]  # (graph_exec, error node, log)

    def opt_in_shared(self, fn, shared: int) -> None:
        """Nothing: Triton's AMD backend keeps a kernel's LDS within the architecture's 64 KiB, which
        every kernel may use without opting in (Triton's own HIP launcher sets no attribute)."""

    def pick_target(self, targets: list, name: str | None = None) -> tuple[dict, bool]:
        return pick_hip_target(targets, self.device["arch"], name), False


def _text(v) -> str:
    return (v.decode(errors="replace") if isinstance(v, bytes) else str(v)).split("\0")[0]


def pick_cuda_target(targets: list, capability: tuple[int, int], name: str | None = None) -> tuple[dict, bool]:
    """(cuda target entry, use_ptx) for a device of `capability`: its own architecture's cubins,
    else cubins of the same major version and a lower minor (not arch-specific `a` code), else
    portable PTX for an older architecture (JIT-compiled by the driver). GpuUnavailable otherwise."""
    major, minor = capability
    cuda = [t for t in targets if isinstance(t, dict) and t.get("kind") == "cuda"
            and (name is None or t.get("name") == name)]
    arch = f"sm_{major}{minor}"

    def cc(t):
        try:
            return int(str(t.get("arch", "")).removeprefix("sm_"))
        except ValueError:
            return -1
    for t in cuda:
        if t.get("arch") == arch:
            return t, False
    same_major = [t for t in cuda if cc(t) // 10 == major and cc(t) <= major * 10 + minor and t.get("ptx_portable")]
    if same_major:
        return max(same_major, key=cc), False
    ptx = [t for t in cuda if t.get("ptx_portable") and 0 <= cc(t) <= major * 10 + minor]
    if ptx:
        return max(ptx, key=cc), True
    have = ", ".join(str(t.get("arch")) for t in cuda) or "none"
    raise GpuUnavailable(f"cuda: this GPU is {arch}; the bundle has cuda kernels for {have} and no PTX it can "
                         "JIT-compile (compile with --arch " + arch + ")")


def pick_hip_target(targets: list, arch: str, name: str | None = None) -> dict:
    """The hip target entry of the device's architecture (gfx90a, gfx942, ...): hsaco code objects
    run only on the architecture they were built for, and there is no portable form to fall back
    to. GpuUnavailable otherwise."""
    hip = [t for t in targets if isinstance(t, dict) and t.get("kind") == "hip"
           and (name is None or t.get("name") == name)]
    for t in hip:
        if t.get("arch") == arch:
            return t
    have = ", ".join(str(t.get("arch")) for t in hip) or "none"
    raise GpuUnavailable(f"hip: this GPU is {arch}; the bundle has hip kernels for {have} (compile with --arch {arch})")


DRIVERS = {"cuda": CudaDriver, "hip": HipDriver}
