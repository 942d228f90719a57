"""`lift bench gpu` / ``python bench/gpu_bench.py``: PyTorch speed of the models on one GPU, in minutes.

What it measures (random weights: speed does not depend on their values):

* **throughput** (images/s) of backbone + upsampler, the :class:`DenseExtractor` of the named
  models ``lift-dino-vits16`` (DINO ViT-S/16 key facet + LiFT, 2x) and ``uplift-dinov2-s14``
  (DINOv2 ViT-S/14 + UPLiFT, its default 2 steps = 4x), at sides 224 and 448, precisions fp32 /
  bf16 / fp16, batch sizes 1, 2, 4 ... 256. Each case: warm-up calls, then calls for a fixed time
  budget, timed with CUDA events; peak memory from ``torch.cuda.max_memory_allocated``. A batch
  that runs out of memory ends that size's sweep and is recorded. Input is a normalised float
  tensor already on the device: no decoding, resizing or host-to-device copy.
* **training step throughput**: the trainer's own step (``training.trainer.TrainStep``, the
  objective ``lift train`` optimises for that upsampler) on random images already on the device.
* **agreement** of bf16 and fp16 (and, on CUDA, fp32 with torch's default TF32 convolutions) with
  strict fp32 features: same weights, same inputs; max / mean absolute error, mean and minimum
  per-cell cosine similarity.

Reduced precision is ``torch.autocast``, not ``.half()``: it is what the trainer uses, it keeps the
numerically delicate ops (softmax, layer/batch norms, reductions) in fp32 as any PyTorch user
gets by default, and the fp32 and reduced cases run the very same weights. A fully cast model
can be somewhat faster at small batches; it is not measured.

It runs from a checkout without installing anything: as a script it maps the repository's folders
onto the ``lift_serve`` namespace (as ``hubconf.py`` does). The model code needs ``timm`` (which
imports ``torchvision`` and Pillow); the training step also needs ``pydantic`` (the trainer
imports the checkpoint and bundle code). Where one is missing the run stops before any work and
prints the ``pip download`` commands that fetch wheels on a machine with internet access; pass
their folder with ``--wheels DIR`` (or ``LIFT_BENCH_WHEELS``): every wheel in it is unpacked into
a temporary folder put first on ``sys.path``. Nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util  # here, not in CheckoutFinder.find_spec: an import there would call the finder again
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HELP = "PyTorch CUDA throughput, memory, training steps/s and fp16/bf16 agreement of the models; writes JSON"
DEFAULT_OUT = "runs/bench_gpu.json"
DEFAULT_MODELS = "lift-dino-vits16,uplift-dinov2-s14"
PRECISIONS = ("fp32", "bf16", "fp16")
WHEELS_ENV = "LIFT_BENCH_WHEELS"
# Same timm classes as the real backbones, 2 blocks of width 64 (UPLiFT needs >= 64 channels):
# for testing this script; the numbers then mean nothing.
TINY_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
# Folders of a checkout -> their import names (pyproject.toml's package-dir).
CHECKOUT_FOLDERS = {"lift_serve": "lift_serve", "lift_serve.model": "model", "lift_serve.training": "training",
                    "lift_serve.hub": "hub", "lift_serve.bundle": "bundle", "lift_serve.bench": "bench"}
# What each part imports beyond torch (timm imports torchvision and Pillow; the trainer imports the
# checkpoint and bundle code, hence pydantic, and the data code, hence Pillow). ``companions`` are
# checked only when the module itself is missing: they come with it.
NEEDS = {"model code": ["timm", "torchvision", "PIL"], "the training step": ["pydantic", "PIL", "numpy"]}
COMPANIONS = {"pydantic": ["pydantic_core", "annotated_types", "typing_extensions", "typing_inspection"]}
# import name -> what to ask pip for (pyproject.toml's ranges where it has one)
REQUIREMENTS = {"timm": '"timm>=1.0.9,<2"', "PIL": "pillow", "yaml": "pyyaml", "pydantic": '"pydantic>=2.7,<3"',
                **{m: '"pydantic>=2.7,<3"' for m in COMPANIONS["pydantic"]}}

# Settings a flag leaves unset take these: a full run (108 throughput cases of about a second each
# plus the rest: planned for 3-5 minutes on a current GPU; max_seconds caps it, so that with imports
# and CUDA start-up it ends within 8), --quick on a GPU (about a minute), --quick on the CPU (small sizes).
PRESETS = {
    "full": dict(sizes="224,448", batch_sizes="1,2,4,8,16,32,64,128,256", case_seconds=0.8, warmup=3,
                 train_steps=5, train_batch=32, train_size=224, agree_size=224, agree_batch=4, max_seconds=420),
    "quick": dict(sizes="224", batch_sizes="1,8,64", case_seconds=0.25, warmup=2, train_steps=3, train_batch=8,
                  train_size=224, agree_size=224, agree_batch=2, max_seconds=120),
    "quick-cpu": dict(sizes="64", batch_sizes="1,2", case_seconds=0.1, warmup=1, train_steps=2, train_batch=2,
                      train_size=32, agree_size=64, agree_batch=1, max_seconds=120),
}

MEASURES = (
    "PyTorch eager speed of backbone + upsampler (DenseExtractor) on random weights and random normalised "
    "input already on the device: images/s and peak memory per model, side, precision (torch.autocast) and "
    "batch; steps/s of the trainer's own step (TrainStep) on random images already on the device; agreement "
    "of bf16/fp16 (and TF32) features with strict fp32 for the same weights and inputs."
)
CANNOT = [
    "ONNX Runtime's CUDA and TensorRT execution providers (what the service runs) are not measured: they need "
    "the `gpu` extra (onnxruntime-gpu) and an exported bundle; `lift bench export` times the bundle on the "
    "CPU provider",
    "image decoding, resizing, host-to-device copies, HTTP and batching delays are excluded",
    "data loading is excluded from the training figure: it is the compute ceiling of `lift train`",
    "torch.compile, CUDA graphs, channels_last, cudnn.benchmark and fully cast (.half()) weights are not tried",
    "one GPU only: no DistributedDataParallel",
    "random weights: agreement with pretrained weights (other value ranges, fp16 overflow) may differ",
]


class BenchSetupError(RuntimeError):
    """The benchmark cannot start here; the message says what is missing and how to fix it."""

    user_facing = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: side 224, batches 1/8/64 (CPU: side 64, batches 1/2)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="PATH", help="JSON results (default: %(default)s)")
    parser.add_argument("--wheels", default=os.environ.get(WHEELS_ENV), metavar="DIR",
                        help=f"folder of wheels (timm, ...) to import from without installing (default: ${WHEELS_ENV})")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="named models, comma-separated (default: %(default)s)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="(default: %(default)s)")
    parser.add_argument("--train-precisions", default=None,
                        help="precisions of the training step (default: those of --precisions)")
    parser.add_argument("--sizes", default=None, help="image sides, rounded down to the patch size (default: 224,448)")
    parser.add_argument("--batch-sizes", default=None, help="(default: 1,2,4,...,256)")
    parser.add_argument("--case-seconds", type=float, default=None, help="timed seconds per case (default: 0.8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default: 3)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="seconds from the start after which no throughput case starts; the rest are recorded as "
                             "skipped (default: 420)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps, 0 = none (default: 5)")
    parser.add_argument("--train-batch", type=int, default=None, help="(default: 32)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training image side, rounded up to what the objective needs (default: 224)")
    parser.add_argument("--agree-size", type=int, default=None, help="image side of the agreement check (default: 224)")
    parser.add_argument("--agree-batch", type=int, default=None, help="(default: 4)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"tiny backbones ({TINY_KWARGS}) of the same timm classes: tests the script, not speed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")


@dataclasses.dataclass
class Settings:
    device: str
    models: list[str]
    precisions: list[str]
    train_precisions: list[str]
    sizes: list[int]
    batch_sizes: list[int]
    case_seconds: float
    warmup: int
    max_seconds: float
    train_steps: int
    train_batch: int
    train_size: int
    agree_size: int
    agree_batch: int
    tiny: bool
    threads: int
    seed: int
    quick: bool


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise BenchSetupError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise BenchSetupError(f"{flag} needs positive integers, got {text!r}")
    return values


def _precision_list(text: str, flag: str) -> list[str]:
    values = [p.strip() for p in text.split(",") if p.strip()]
    if not values or set(values) - set(PRECISIONS):
        raise BenchSetupError(f"{flag} takes a comma-separated subset of {PRECISIONS}, got {text!r}")
    return values


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The flags, with what they leave unset taken from the preset of the run's kind."""
    preset = PRESETS["full" if not args.quick else "quick-cpu" if args.device == "cpu" else "quick"]
    value = {k: preset[k] if getattr(args, k) is None else getattr(args, k) for k in preset}
    precisions = _precision_list(args.precisions, "--precisions")
    train_precisions = precisions if args.train_precisions is None else _precision_list(args.train_precisions,
                                                                                         "--train-precisions")
    settings = Settings(
        device=args.device, models=[m.strip() for m in args.models.split(",") if m.strip()],
        precisions=precisions, train_precisions=train_precisions, sizes=_int_list(value["sizes"], "--sizes"),
        batch_sizes=sorted(set(_int_list(value["batch_sizes"], "--batch-sizes"))),
        case_seconds=float(value["case_seconds"]), warmup=int(value["warmup"]), max_seconds=float(value["max_seconds"]),
        train_steps=int(value["train_steps"]), train_batch=int(value["train_batch"]),
        train_size=int(value["train_size"]), agree_size=int(value["agree_size"]),
        agree_batch=int(value["agree_batch"]), tiny=args.tiny, threads=args.threads, seed=args.seed,
        quick=args.quick)
    if settings.case_seconds <= 0 or settings.max_seconds <= 0 or min(settings.warmup, settings.train_steps,
                                                                        settings.threads) < 0:
        raise BenchSetupError("--case-seconds and --max-seconds must be > 0, --warmup, --train-steps and "
                              "--threads >= 0")
    if min(settings.train_size, settings.agree_size, settings.agree_batch) < 1 or settings.train_batch < 2:
        raise BenchSetupError("--train-batch must be >= 2 (the upsamplers' BatchNorm trains on batch statistics), "
                              "--train-size, --agree-size and --agree-batch >= 1")
    return settings


# -- running from a checkout, and wheels instead of installed packages --------------------------------
class CheckoutFinder:
    """Finds ``lift_serve`` and its subpackages in a checkout's folders (``CHECKOUT_FOLDERS``), on
    demand, ahead of any installed copy: the script runs the code it sits in, and a subpackage whose
    dependencies are absent (the bundle contract needs pydantic) is only imported when used."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        folder = CHECKOUT_FOLDERS.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, self.root / folder / "__init__.py",
                                                      submodule_search_locations=[str(self.root / folder)])


def use_checkout(root: Path) -> None:
    if not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(root))


def _wheel_fits(filename: str) -> bool:
    """Whether a wheel's tags (``name-version[-build]-python-abi-platform.whl``) load in this Python."""
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return False
    pythons, abi, plats = parts[-3].split("."), parts[-2], parts[-1].lower().split(".")
    minor = sys.version_info.minor
    python_ok = (f"cp3{minor}" in pythons or any(t in ("py3", "py2") for t in pythons)
                 or (abi == "abi3" and any(t.startswith("cp3") and t[3:].isdigit() and int(t[3:]) <= minor
                                           for t in pythons)))
    system = {"linux": "linux", "darwin": "macosx", "win32": "win"}.get(sys.platform, sys.platform)
    machine = {"amd64": "x86_64"}.get(platform.machine().lower(), platform.machine().lower())
    plat_ok = "any" in plats or any(system in t and (machine in t or machine.replace("x86_64", "amd64") in t)
                                    for t in plats)
    return python_ok and plat_ok


def add_wheels(folder: str | Path) -> list[str]:
    """Unpack every wheel in ``folder`` that fits this Python into a temporary folder put first on
    ``sys.path`` (unpacked rather than zip-imported: compiled modules cannot load from a zip).
    Returns the wheels used."""
    import atexit
    import shutil
    import zipfile

    folder = Path(folder).expanduser()
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        raise BenchSetupError(f"--wheels {folder}: no .whl files there (see --help for how to make them)")
    target = Path(tempfile.mkdtemp(prefix="lift-bench-wheels-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    used = []
    for wheel in wheels:
        if not _wheel_fits(wheel.name):
            print(f"note: skipping {wheel.name}: built for another Python or platform", file=sys.stderr)
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        used.append(wheel.name)
    sys.path.insert(0, str(target))
    return used


def _torchvision_for(torch_version: str) -> tuple[str, str]:
    """(requirement, extra pip options) of the torchvision release built for this torch."""
    release, _, local = torch_version.partition("+")
    match = re.fullmatch(r"2\.(\d+)\.(\d+)", release)
    if not match:  # a custom build (e.g. a vendor container's 2.x.0a0): only its own torchvision fits
        return "torchvision", f"   # torch {torch_version} is a custom build: use the torchvision built with it"
    index = f" --index-url https://download.pytorch.org/whl/{local}" if local else ""
    return f"torchvision==0.{int(match.group(1)) + 15}.{match.group(2)}", index


def _torch_version() -> str:
    """torch's version from its metadata, without the seconds an import of torch takes."""
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        import torch

        return torch.__version__


def fix_commands(missing: list[str]) -> list[str]:
    """``pip download`` lines, for a machine with internet access, that fetch ``missing`` (import
    names) as wheels for this Python and platform."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    machine = platform.machine() or "x86_64"
    target = (f"--only-binary=:all: --python-version {python} --platform manylinux_2_28_{machine} "
              f"--platform manylinux2014_{machine}")
    lines = []
    if "timm" in missing:  # pure Python; its own dependencies (torch...) are this host's business
        lines.append(f"pip download {REQUIREMENTS['timm']} --no-deps -d wheels/")
    if "torchvision" in missing:
        requirement, extra = _torchvision_for(_torch_version())
        lines.append(f"pip download {requirement} --no-deps {target}{extra} -d wheels/")
    rest = list(dict.fromkeys(REQUIREMENTS.get(m, m) for m in missing if m not in ("timm", "torchvision")))
    if rest:  # with their dependencies (pydantic pins its pydantic-core), built for this host
        lines.append(f"pip download {' '.join(rest)} {target} -d wheels/")
    return lines


def missing_message(missing: dict[str, list[str]]) -> str:
    """``missing``: part of the run -> the import names it lacks."""
    names = list(dict.fromkeys(m for part in missing.values() for m in part))
    needs = "; ".join(f"{part} needs {', '.join(mods)}" for part, mods in missing.items())
    commands = "\n".join(f"    {line}" for line in fix_commands(names))
    install = " ".join(dict.fromkeys(_torchvision_for(_torch_version())[0] if m == "torchvision"
                                     else REQUIREMENTS.get(m, m) for m in names))
    skip = ("\nOr pass --train-steps 0 to skip the training measurement."
            if list(missing) == ["the training step"] else "")
    return (f"missing Python packages: {needs}. On a machine with internet access run\n{commands}\n"
            f"copy wheels/ here and rerun with --wheels wheels/ (or {WHEELS_ENV}=wheels/); with internet "
            f"access here, pip install {install} works too.{skip}")


def _absent(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _import_or_explain(modules: list[str], part: str) -> None:
    """Import ``modules``; a dependency that :data:`NEEDS` does not list (e.g. a newer timm's), or a
    broken one, becomes one clear message, never a traceback."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").partition(".")[0]
            if not top or top == "lift_serve":
                raise
            raise BenchSetupError(missing_message({part: [top]})) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
            lines = "\n".join(f"    {line}" for line in fix_commands(["torchvision"]))
            raise BenchSetupError(
                f"{part}: importing {module} failed ({type(exc).__name__}: {str(exc)[:300]}). When torchvision is "
                f"the cause, it must be the release built for this torch:\n{lines}") from None


def check_environment(settings: Settings) -> None:
    """Everything the run needs, checked before any work; what is missing is found without
    importing torch, so the answer comes at once."""
    if _absent("torch"):
        raise BenchSetupError("PyTorch is not installed in this Python; this benchmark measures PyTorch")
    parts = ["model code"] + (["the training step"] if settings.train_steps else [])
    missing = {}
    for part in parts:
        lacking = [m for m in NEEDS[part] if _absent(m)]
        lacking += [c for m in lacking for c in COMPANIONS.get(m, []) if _absent(c)]
        if lacking:
            missing[part] = lacking
    if missing:
        raise BenchSetupError(missing_message(missing))
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BenchSetupError(f"--device cuda, but torch {torch.__version__} ({built}) sees no CUDA device; "
                              "check the driver and CUDA_VISIBLE_DEVICES, or run with --device cpu")
    _import_or_explain(["timm", "lift_serve.model.backbone", "lift_serve.model.extractor"], "model code")
    if settings.train_steps:
        _import_or_explain(["lift_serve.training.trainer"], "the training step")


# -- the machine ------------------------------------------------------------------------------------
def _driver_version() -> str | None:
    """The NVIDIA driver (torch exposes none): from the kernel module, else nvidia-smi, else None."""
    import subprocess

    with contextlib.suppress(OSError):
        found = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found.group(1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
        return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None
    return None


def _tf32_flags() -> dict:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}


def environment(device) -> dict:
    import timm
    import torch

    facts = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
             "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "cuda_build": torch.version.cuda, "device": str(device),
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), **_tf32_flags()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                     gpu_memory_gb=round(props.total_memory / 2**30, 1),
                     multiprocessors=props.multi_processor_count, gpu_uuid=str(getattr(props, "uuid", "")) or None,
                     driver=_driver_version(), bf16_supported=_native_bf16())
    else:
        facts.update(gpu=None, cpu=platform.processor() or platform.machine())
    return facts


# -- timing -----------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 in matmuls or convolutions while inside (torch's defaults allow it in cuDNN convs)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def timed_calls(work, device, warmup: int, budget_s: float, min_calls: int = 3, max_calls: int = 10_000) -> dict:
    """Call ``work()`` ``warmup`` times, then until ``budget_s`` seconds have passed (at least
    ``min_calls``). Per-call times come from CUDA events on a GPU (the host may run ahead; events
    time the device) and from the wall clock on the CPU; ``total_s`` spans the first call's start
    to the last one's end, launch gaps included."""
    import torch

    for _ in range(warmup):
        work()
    _sync(device)
    started, events, wall = time.perf_counter(), [], []
    while len(events) + len(wall) < max_calls:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            work()
            end.record()
            events.append((begin, end))
        else:
            t = time.perf_counter()
            work()
            wall.append(time.perf_counter() - t)
        if len(events) + len(wall) >= min_calls and time.perf_counter() - started >= budget_s:
            break
    _sync(device)
    if device.type == "cuda":
        seconds = [b.elapsed_time(e) / 1000 for b, e in events]
        total = events[0][0].elapsed_time(events[-1][1]) / 1000
    else:
        seconds, total = wall, time.perf_counter() - started
    return {"calls": len(seconds), "total_s": total, "median_s": statistics.median(seconds), "min_s": min(seconds)}


class Memory:
    """Peak device memory of one case (CUDA only; None on the CPU)."""

    def __init__(self, device):
        self.device, self.base = device, None

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        return False

    def facts(self) -> dict:
        import torch

        if self.device.type != "cuda":
            return {"peak_memory_mb": None, "peak_above_start_mb": None}
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"peak_memory_mb": round(peak / 2**20, 1), "peak_above_start_mb": round((peak - self.base) / 2**20, 1)}


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(exc)
    return isinstance(exc, oom) or "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def _free(device, failed: bool = False) -> None:
    """Give the device memory of a finished case back, so the next case's peak is its own. A failed
    case's traceback holds its tensors in reference cycles: only then is a (slow) collection needed."""
    import gc

    import torch

    if failed:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _native_bf16() -> bool:
    """bf16 in hardware (compute capability 8.0+), not the emulation newer torch also counts."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch: no emulation counted anyway
        return bool(torch.cuda.is_bf16_supported())


def supported_precisions(wanted: list[str], device) -> tuple[list[str], dict[str, str]]:
    """Those of ``wanted`` this device runs under autocast, and why the others are left out."""
    import torch

    usable, left_out = [], {}
    for precision in wanted:
        if precision == "fp32":
            usable.append(precision)
            continue
        if device.type == "cuda" and precision == "bf16" and not _native_bf16():
            left_out[precision] = "this GPU has no bf16 support (needs compute capability 8.0+)"
            continue
        try:  # the CPU's autocast support depends on the torch build
            with torch.no_grad(), autocast(device, precision):
                conv = torch.nn.Conv2d(3, 4, 3).to(device)
                conv(torch.randn(1, 3, 8, 8, device=device)).float().sum().item()
            usable.append(precision)
        except Exception as exc:  # noqa: BLE001 - any failure means "not on this device"
            left_out[precision] = f"autocast {precision} fails on {device.type}: {type(exc).__name__}: {exc}"[:300]
    return usable, left_out


# -- the models -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    name: str
    spec_dict: dict
    upsampler: str
    iterations: int
    extractor: object  # DenseExtractor


def build_models(settings: Settings, device) -> list[Built]:
    """The named models' extractors with random weights, built as ``hubconf``'s ``pretrained=False``
    builds them (without the checkpoint code, which the throughput part does not need)."""
    import torch
    from lift_serve.hub.models import REGISTRY
    from lift_serve.model.backbone import build_backbone
    from lift_serve.model.extractor import DenseExtractor
    from lift_serve.model.named import backbone_spec
    from lift_serve.model.upsampler import build_upsampler

    unknown = [m for m in settings.models if m not in REGISTRY]
    if unknown or not settings.models:
        raise BenchSetupError(f"--models: unknown {unknown}; choose from {', '.join(sorted(REGISTRY))}")
    built = []
    for name in settings.models:
        entry = REGISTRY[name]
        spec = backbone_spec(entry, pretrained=False)
        if settings.tiny:
            spec = dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, **TINY_KWARGS})
        backbone = build_backbone(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            upsampler = build_upsampler(entry.upsampler, {"in_channels": backbone.embed_dim,
                                                          "patch_size": backbone.patch_size})
        extractor = DenseExtractor(backbone, upsampler.eval(), entry.default_iterations).eval().to(device)
        built.append(Built(name, spec.to_dict(), entry.upsampler, entry.default_iterations, extractor))
    return built


def model_facts(model: Built) -> dict:
    extractor = model.extractor
    return {"model": model.name, "backbone": extractor.backbone.spec.to_dict(), "upsampler": model.upsampler,
            "iterations": model.iterations, "density": f"{2 ** model.iterations}x",
            "patch_size": extractor.backbone.patch_size, "channels": extractor.channels,
            "backbone_parameters": sum(p.numel() for p in extractor.backbone.parameters()),
            "upsampler_parameters": sum(p.numel() for p in extractor.lift.parameters())}


def side_for(size: int, patch: int) -> int:
    """``size`` rounded down to a whole number of patches (at least one)."""
    return max(patch, size - size % patch)


def random_images(batch: int, side: int, device, seed: int):
    """A normalised-looking ``[batch, 3, side, side]`` input, drawn on the device itself (256 images of
    448 px drawn on the host would take seconds per case)."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=generator, device=device)


# -- 1. throughput ----------------------------------------------------------------------------------
def throughput_case(model: Built, side: int, precision: str, batch: int, settings: Settings, device) -> dict:
    import torch

    row = {"model": model.name, "size": side, "precision": precision, "batch_size": batch}
    image, failed = None, True
    try:
        image = random_images(batch, side, device, settings.seed)
        with Memory(device) as memory, torch.inference_mode(), autocast(device, precision):
            timing = timed_calls(lambda: model.extractor(image), device, settings.warmup, settings.case_seconds)
        row.update(status="ok", images_per_s=batch * timing["calls"] / timing["total_s"],
                   ms_per_batch_median=1000 * timing["median_s"], ms_per_batch_min=1000 * timing["min_s"],
                   calls=timing["calls"], timed_s=timing["total_s"], **memory.facts())
        failed = False
    except Exception as exc:  # noqa: BLE001 - recorded; a failed batch size ends this sweep only
        row.update(status="oom" if is_out_of_memory(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        image = None  # released before the cache is emptied
        _free(device, failed)
    return row


def throughput(models: list[Built], precisions: list[str], settings: Settings, device, progress, deadline) -> list:
    rows = []
    for model in models:
        patch = model.extractor.backbone.patch_size
        for side in (side_for(s, patch) for s in settings.sizes):
            for precision in precisions:
                stopped = None
                for batch in settings.batch_sizes:
                    if stopped is None and time.monotonic() > deadline:
                        stopped = "time budget (--max-seconds) spent"
                    if stopped:
                        rows.append({"model": model.name, "size": side, "precision": precision, "batch_size": batch,
                                     "status": "skipped", "reason": stopped})
                        progress.step()
                        continue
                    row = throughput_case(model, side, precision, batch, settings, device)
                    rows.append(row)
                    progress.step(_describe(row))
                    if row["status"] != "ok":
                        stopped = f"batch {batch} failed ({row['status']}): larger batches not tried"
    return rows


def _describe(row: dict) -> str:
    head = f"{row['model']} {row['size']}px {row['precision']} batch {row['batch_size']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    memory = f", peak {row['peak_memory_mb']:.0f} MB" if row.get("peak_memory_mb") is not None else ""
    return f"{head}: {row['images_per_s']:.1f} images/s{memory}"


# -- 2. training steps ------------------------------------------------------------------------------
def train_case(model: Built, precision: str, settings: Settings, device) -> dict:
    """Steps/s of the trainer's TrainStep for this model's upsampler, built as ``lift train`` builds it."""
    import functools

    import torch
    from lift_serve.model.extractor import Preprocessing
    from lift_serve.training.config import TrainConfig, levels_of, resolved_loss, smallest_imsize
    from lift_serve.training.objective import MultiStepUpsampler, TwoOctaveLiFT, uplift_loss
    from lift_serve.training.trainer import TrainStep, build_models

    config = TrainConfig(data="", out="", backbone=model.spec_dict, upsampler=model.upsampler, precision=precision,
                         batch_size=settings.train_batch, seed=settings.seed)
    levels = levels_of(config)
    patch = model.extractor.backbone.patch_size
    config.imsize = smallest_imsize(settings.train_size, patch, levels)
    row = {"model": model.name, "upsampler": model.upsampler, "precision": precision, "imsize": config.imsize,
           "batch_size": config.batch_size, "loss": resolved_loss(config), "levels": levels}
    try:
        backbone, upsampler = build_models(config.backbone, config.imsize, config.seed, config.upsampler, levels)
        backbone.to(device)
        upsampler.to(device).train()
        if config.upsampler == "uplift":
            pair = MultiStepUpsampler(upsampler)
            objective = functools.partial(uplift_loss, levels=config.uplift_levels, loss=row["loss"])
        else:
            pair, objective = TwoOctaveLiFT(upsampler), None
        step = TrainStep(backbone, pair, Preprocessing(backbone.mean, backbone.std, backbone.patch_size), config.lr,
                         precision, row["loss"], config.downsample, device, objective)
    except Exception as exc:  # e.g. fp16 training needs CUDA (the trainer says so)
        if not getattr(exc, "user_facing", False):
            raise
        return {**row, "status": "skipped", "reason": str(exc)}
    images = torch.rand(config.batch_size, 3, config.imsize, config.imsize,
                        generator=torch.Generator().manual_seed(settings.seed)).to(device)
    losses, failed = [], True
    try:
        with Memory(device) as memory:
            timing = timed_calls(lambda: losses.append(step(images)[0]), device, min(2, max(1, settings.warmup)),
                                 0.0, min_calls=settings.train_steps, max_calls=settings.train_steps)
        last = float(losses[-1])
        row.update(status="ok", steps_per_s=1 / timing["median_s"], images_per_s=config.batch_size / timing["median_s"],
                   ms_per_step_median=1000 * timing["median_s"], steps=timing["calls"], last_loss=last,
                   loss_finite=math.isfinite(last), **memory.facts())
        failed = False
    except Exception as exc:  # noqa: BLE001 - recorded
        row.update(status="oom" if is_out_of_memory(exc) else "error", error=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        step = images = backbone = upsampler = pair = None  # released before the cache is emptied
        losses.clear()
        _free(device, failed)
    return row


# -- 3. agreement -----------------------------------------------------------------------------------
def compare(result, reference) -> dict:
    """Max / mean absolute error and per-cell cosine (over channels) of ``result`` against ``reference``."""
    import torch
    import torch.nn.functional as F

    out, ref = result.double(), reference.double()
    finite = torch.isfinite(out)
    diff = (out - ref).abs()
    cosine = F.cosine_similarity(out, ref, dim=1, eps=1e-12)
    ref_max = float(ref.abs().max())
    return {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean()),
            "reference_max_abs": ref_max, "relative_max_error": float(diff.max()) / ref_max if ref_max else None,
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "nonfinite_values": int((~finite).sum()), "shape": list(out.shape), "dtype": str(result.dtype)}


def agreement(model: Built, precisions: list[str], settings: Settings, device) -> list[dict]:
    import torch

    side = side_for(settings.agree_size, model.extractor.backbone.patch_size)
    image = random_images(settings.agree_batch, side, device, settings.seed + 1)
    head = {"model": model.name, "size": side, "batch_size": settings.agree_batch, "reference": "fp32 strict"}

    def run(precision: str):
        with torch.inference_mode(), autocast(device, precision):
            return model.extractor(image)

    with strict_fp32():
        reference, repeat = run("fp32"), run("fp32")
    rows = [{**head, "precision": "fp32", "note": "strict fp32 run again: exact where the kernels are "
             "deterministic", **compare(repeat, reference)}]
    if device.type == "cuda":
        rows.append({**head, "precision": "fp32+tf32", "note": "fp32 as the throughput cases run it: torch's "
                     "TF32 flags as they are (environment), by default TF32 in cuDNN convolutions",
                     **compare(run("fp32"), reference)})
    for precision in precisions:
        if precision != "fp32":
            rows.append({**head, "precision": precision, "note": "torch.autocast",
                         **compare(run(precision), reference)})
    image = reference = repeat = None
    _free(device)
    return rows


# -- progress, report -------------------------------------------------------------------------------
class Progress:
    """tqdm where it is installed, else one printed line a step."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, message: str | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if message:
                self.bar.set_postfix_str(message[-70:])
        elif message:
            print(f"[{self.done}/{self.total}] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finite_json(value):
    """NaN and infinities (e.g. an fp16 overflow) as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def summary(result: dict) -> str:
    lines = ["throughput: best images/s over batch sizes (peak MB at that batch)"]
    best: dict[tuple, dict] = {}
    for row in result["throughput"]:
        key = (row["model"], row["size"], row["precision"])
        if row["status"] == "ok" and row["images_per_s"] > best.get(key, {}).get("images_per_s", -1):
            best[key] = row
    for (name, size, precision), row in best.items():
        memory = "" if row["peak_memory_mb"] is None else f" ({row['peak_memory_mb']:.0f} MB)"
        lines.append(f"  {name:<20} {size:>4}px {precision:<5} {row['images_per_s']:10.1f} at batch "
                     f"{row['batch_size']}{memory}")
    lines.append("training steps (the trainer's TrainStep)")
    for row in result["train"]:
        figure = (f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:.1f} images/s" if row["status"] == "ok"
                  else f"{row['status']}: {row.get('reason') or row.get('error')}"[:100])
        lines.append(f"  {row['model']:<20} {row['precision']:<5} {figure}")
    lines.append("agreement with strict fp32 (max abs error, mean / min cosine)")
    for row in result["agreement"]:
        lines.append(f"  {row['model']:<20} {row['precision']:<9} {row['max_abs_error']:.3g}  "
                     f"{row['cosine_mean']:.6f} / {row['cosine_min']:.6f}")
    return "\n".join(lines)


class Phases:
    """Seconds each part of the run took, for the JSON."""

    def __init__(self, started: float):
        self.last, self.seconds = started, {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name], self.last = round(now - self.last, 2), now


def measure(settings: Settings, started: float) -> dict:
    """The three measurements, in the order cheap first: agreement, training steps, throughput (which
    gets what is left of ``--max-seconds``)."""
    import torch

    device = torch.device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    phases = Phases(started)
    facts = environment(device)
    phases.done("imports")
    models = build_models(settings, device)
    usable, left_out = supported_precisions(list(dict.fromkeys(settings.precisions + settings.train_precisions)),
                                            device)
    precisions = [p for p in settings.precisions if p in usable]
    train_precisions = [p for p in settings.train_precisions if p in usable] if settings.train_steps else []
    phases.done("build")
    progress = Progress(len(models) * (1 + len(train_precisions))
                        + len(models) * len(settings.sizes) * len(precisions) * len(settings.batch_sizes))
    agreement_rows, train_rows = [], []
    try:
        for model in models:
            agreement_rows += agreement(model, precisions, settings, device)
            progress.step(f"{model.name}: agreement")
        phases.done("agreement")
        for model in models:
            for precision in train_precisions:
                train_rows.append(train_case(model, precision, settings, device))
                progress.step(f"{model.name} train {precision}: {train_rows[-1]['status']}")
        phases.done("train")
        throughput_rows = throughput(models, precisions, settings, device, progress, started + settings.max_seconds)
        phases.done("throughput")
    finally:
        progress.close()
    return {"precisions_left_out": left_out, "environment": facts, "models": [model_facts(m) for m in models],
            "throughput": throughput_rows, "train": train_rows, "agreement": agreement_rows,
            "phase_seconds": phases.seconds}


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    settings = resolve_settings(args)
    wheels = add_wheels(args.wheels) if args.wheels else []
    check_environment(settings)
    measured = measure(settings, started)
    result = {
        "benchmark": "gpu", "what_this_measures": MEASURES, "what_it_cannot": CANNOT,
        "precision_method": "torch.autocast (weights stay fp32; matmuls and convolutions in bf16/fp16, softmax and "
                            "norms in fp32), the trainer's choice; 'fp32' runs torch's default TF32 flags",
        "weights": "random (speed does not depend on their values)" + ("; tiny backbones" if settings.tiny else ""),
        "cpu_note": None if settings.device == "cuda" else (
            "CPU run: reduced precisions run where the CPU's autocast supports them and are often slower than fp32 "
            "there; the trainer refuses fp16 on the CPU; no peak memory (CUDA only)"),
        "settings": dataclasses.asdict(settings), "wheels": wheels,
        "code_from": str(Path(sys.modules["lift_serve.model"].__file__).resolve().parent),
        **measured, "wall_seconds": round(time.monotonic() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite_json(result), indent=2))
    print(summary(result))
    print(f"{result['wall_seconds']:.0f} s; wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not getattr(exc, "user_facing", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == here:
        sys.path.pop(0)  # bench/'s modules (report, plots, ...) must not shadow top-level ones
    use_checkout(here.parent)
    sys.exit(main())
