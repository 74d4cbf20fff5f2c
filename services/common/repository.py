"""The model repository: `<root>/<model>/config.json` and `<root>/<model>/<version>/<file>`.

Triton-like layout. A config declares inputs and outputs, batching, caching, warmup,
classifier post-processing and the version policy. Invalid configs fail with a
ConfigError naming the file and the field. This module imports neither grpc nor protobuf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshserve.common.datatypes import DATATYPES
from meshserve.common.errors import ConfigError, FailedPrecondition, InvalidInput, NotFound

CONFIG_FILE = "config.json"
FORMATS = {
    # format -> (default file name, Triton platform reported in ModelConfig/ModelMetadata)
    "torchscript": ("model.pt", "pytorch_libtorch"),
    "mlp_checkpoint": ("model.pth", "pytorch_checkpoint"),
    "torch_export": ("model.pt2", "pytorch_export"),
    "aot_inductor": ("model.pt2", "pytorch_aot_inductor"),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# precision -> torch dtype name the weights and floating inputs are cast to
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# Formats holding an eager module that torch.compile and a weight cast can work on
# (a TorchScript module cannot be compiled; an AOTInductor package is compiled already).
_COMPILABLE = ("torch_export", "mlp_checkpoint")
_CASTABLE = ("torchscript", "torch_export", "mlp_checkpoint")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_TORCH_DATATYPES = tuple(n for n, d in DATATYPES.items() if d.torch_name is not None)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    # Dimensions of one row (without the batch dimension when max_batch_size > 0);
    # -1 accepts any size.
    dims: tuple[int, ...]

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.dims) and all(
            d == -1 or d == s for d, s in zip(self.dims, shape, strict=True)
        )


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 500
    # Priority 1 is the highest level (Triton's convention); 0 on a request means the default.
    priority_levels: int = 1
    default_priority_level: int = 1
    # 0: no queue timeout unless the request brings one.
    default_timeout_us: int = 0
    max_queue_size: int = 1024
    # Adaptive mode picks batch size and wait from the measured latency profile,
    # keeping queue + compute under target_latency_us.
    adaptive: bool = False
    target_latency_us: int = 50_000


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    ttl_s: int = 300
    # Round float inputs to this many decimals before hashing (None: hash exact bytes).
    hash_precision: int | None = None


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    enabled: bool = True
    # Extra batch sizes to warm beyond the buckets (1, 2, 4, ... max, preferred).
    batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CompileConfig:
    """torch.compile at load (every bucket warmed, i.e. compiled, before READY)."""

    mode: str = "default"  # default | reduce-overhead | max-autotune
    dynamic: bool = False
    # On a compiler error, serve the eager model (and report the error) instead of failing.
    fallback: bool = False

    @property
    def captures_cuda_graphs(self) -> bool:
        """These modes capture CUDA graphs themselves (the worker's own are then off)."""
        return self.mode in ("reduce-overhead", "max-autotune")


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """Post-processing of a classifier's logits into named outputs."""

    logits: str
    probabilities: str | None = None  # softmax(logits), FP32 [classes]
    predictions: str | None = None  # argmax(logits), INT64 []
    top_k: int = 0
    top_k_indices: str | None = None  # INT64 [top_k]
    top_k_probabilities: str | None = None  # FP32 [top_k]

    def derived(self) -> tuple[str, ...]:
        names = (self.probabilities, self.predictions, self.top_k_indices, self.top_k_probabilities)
        return tuple(n for n in names if n)


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return [v for v in available if v in self.versions]
        return available[-self.num_versions :] if available else []


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """A default traffic policy (a runtime policy set through meshserve.v1.Routing wins)."""

    split: tuple[tuple[str, float], ...] = ()  # (version, weight)
    shadow: tuple[tuple[str, float], ...] = ()  # (version, percent mirrored)
    fallback: tuple[str, ...] = ()  # "model" or "model:version", tried in order
    fallback_queue_us: int = 0
    max_shadow_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    format: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    classifier: ClassifierConfig | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    default_version: str | None = None
    cuda_graphs: bool = True
    model_filename: str = "model.pt"
    routing: RoutingConfig | None = None
    compile: CompileConfig | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16

    @property
    def platform(self) -> str:
        return FORMATS[self.format][1]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    @property
    def model_outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs the network itself returns, in its return order (not post-processed)."""
        derived = self.classifier.derived() if self.classifier else ()
        return tuple(t for t in self.outputs if t.name not in derived)

    def buckets(self) -> tuple[int, ...]:
        """Batch sizes to warm up and capture: powers of two up to max, max, and preferred."""
        top = max(self.max_batch_size, 1)
        sizes = {top, *self.batching.preferred_batch_sizes, *self.warmup.batch_sizes}
        size = 1
        while size < top:
            sizes.add(size)
            size *= 2
        return tuple(sorted(s for s in sizes if 1 <= s <= top))

    def full_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """Shape as ModelMetadata reports it: with a -1 batch dimension when batching."""
        return ((-1,) + spec.dims) if self.max_batch_size > 0 else spec.dims


# ---------------------------------------------------------------------------- parsing


class _Fields:
    """Reads one JSON object, naming file and field in every error."""

    def __init__(self, where: str, prefix: str, data: Any):
        self.where, self.prefix = where, prefix
        if not isinstance(data, Mapping):
            self.fail("", "must be an object")
        self.data = data

    def fail(self, key: str, message: str):
        path = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        raise ConfigError(f"{self.where}: {path or 'config'}: {message}")

    def check_keys(self, allowed: set[str]) -> None:
        unknown = set(self.data) - allowed
        if unknown:
            self.fail(sorted(unknown)[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required=False):
        if key not in self.data:
            if required:
                self.fail(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(key, f"must be {kinds[0].__name__}, got {value!r}")
        if not isinstance(value, kinds):
            self.fail(key, f"must be {kinds[0].__name__}, got {value!r}")
        return value

    def int(self, key: str, default: int | None = None, minimum: int | None = None, required=False):
        value = self.get(key, int, default, required)
        if value is not None and minimum is not None and value < minimum:
            self.fail(key, f"must be >= {minimum}, got {value}")
        return value

    def sub(self, key: str) -> _Fields | None:
        if key not in self.data:
            return None
        return _Fields(self.where, f"{self.prefix}.{key}" if self.prefix else key, self.data[key])

    def int_list(self, key: str, minimum: int) -> tuple[int, ...]:
        values = self.get(key, list, [])
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                self.fail(key, f"must be a list of integers >= {minimum}, got {values!r}")
        return tuple(values)


def _tensor(where: str, prefix: str, data: Any, batching: bool) -> TensorSpec:
    f = _Fields(where, prefix, data)
    f.check_keys({"name", "datatype", "dims"})
    name = f.get("name", str, required=True)
    if not name:
        f.fail("name", "must not be empty")
    dtype = f.get("datatype", str, required=True)
    if dtype not in _TORCH_DATATYPES:
        f.fail("datatype", f"'{dtype}' is not a tensor datatype of torch models "
               f"(one of {', '.join(_TORCH_DATATYPES)})")
    dims = f.get("dims", list, required=True)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1):
            f.fail("dims", f"must be positive integers or -1, got {dims!r}")
    return TensorSpec(name, dtype, tuple(dims))


def parse_config(data: Any, where: str, expected_name: str | None = None) -> ModelConfig:
    f = _Fields(where, "", data)
    f.check_keys({
        "name", "format", "max_batch_size", "inputs", "outputs", "batching", "cache", "warmup",
        "classifier", "version_policy", "default_version", "cuda_graphs", "model_filename",
        "routing", "compile", "precision",
    })
    name = f.get("name", str, expected_name, required=expected_name is None)
    if expected_name is not None and name != expected_name:
        f.fail("name", f"'{name}' does not match the model's folder '{expected_name}'")
    fmt = f.get("format", str, "torchscript")
    if fmt not in FORMATS:
        f.fail("format", f"'{fmt}' is not one of {', '.join(FORMATS)}")
    max_batch = f.int("max_batch_size", 0, minimum=0)
    batching = max_batch > 0

    inputs = tuple(
        _tensor(where, f"inputs[{i}]", d, batching)
        for i, d in enumerate(f.get("inputs", list, required=True))
    )
    outputs = tuple(
        _tensor(where, f"outputs[{i}]", d, batching)
        for i, d in enumerate(f.get("outputs", list, required=True))
    )
    if not inputs:
        f.fail("inputs", "must declare at least one input")
    if not outputs:
        f.fail("outputs", "must declare at least one output")
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        names = [t.name for t in specs]
        if len(set(names)) != len(names):
            f.fail(key, f"duplicate names in {names}")

    b = f.sub("batching")
    batch_cfg = BatchingConfig()
    if b is not None:
        b.check_keys({
            "preferred_batch_sizes", "max_queue_delay_us", "priority_levels",
            "default_priority_level", "default_timeout_us", "max_queue_size", "adaptive",
            "target_latency_us",
        })
        preferred = b.int_list("preferred_batch_sizes", 1)
        for p in preferred:
            if p > max(max_batch, 1):
                b.fail("preferred_batch_sizes", f"{p} exceeds max_batch_size {max_batch}")
        levels = b.int("priority_levels", batch_cfg.priority_levels, minimum=1)
        default_level = b.int("default_priority_level", batch_cfg.default_priority_level,
                              minimum=1)
        if default_level > levels:
            b.fail("default_priority_level", f"{default_level} exceeds priority_levels {levels}")
        batch_cfg = BatchingConfig(
            preferred_batch_sizes=tuple(sorted(set(preferred))),
            max_queue_delay_us=b.int("max_queue_delay_us", batch_cfg.max_queue_delay_us,
                                     minimum=0),
            priority_levels=levels,
            default_priority_level=default_level,
            default_timeout_us=b.int("default_timeout_us", batch_cfg.default_timeout_us,
                                     minimum=0),
            max_queue_size=b.int("max_queue_size", batch_cfg.max_queue_size, minimum=1),
            adaptive=b.get("adaptive", bool, batch_cfg.adaptive),
            target_latency_us=b.int("target_latency_us", batch_cfg.target_latency_us,
                                    minimum=1),
        )

    c = f.sub("cache")
    cache_cfg = CacheConfig()
    if c is not None:
        c.check_keys({"enabled", "ttl_s", "hash_precision"})
        precision = c.get("hash_precision", int, None)
        if precision is not None and not 0 <= precision <= 15:
            c.fail("hash_precision", f"must be between 0 and 15 decimals, got {precision}")
        cache_cfg = CacheConfig(
            enabled=c.get("enabled", bool, cache_cfg.enabled),
            ttl_s=c.int("ttl_s", cache_cfg.ttl_s, minimum=1),
            hash_precision=precision,
        )

    w = f.sub("warmup")
    warm_cfg = WarmupConfig()
    if w is not None:
        w.check_keys({"enabled", "batch_sizes"})
        extra = w.int_list("batch_sizes", 1)
        for s in extra:
            if s > max(max_batch, 1):
                w.fail("batch_sizes", f"{s} exceeds max_batch_size {max_batch}")
        warm_cfg = WarmupConfig(enabled=w.get("enabled", bool, warm_cfg.enabled),
                                batch_sizes=extra)

    classifier = None
    k = f.sub("classifier")
    if k is not None:
        k.check_keys({
            "logits", "probabilities", "predictions", "top_k", "top_k_indices",
            "top_k_probabilities",
        })
        classifier = ClassifierConfig(
            logits=k.get("logits", str, required=True),
            probabilities=k.get("probabilities", str),
            predictions=k.get("predictions", str),
            top_k=k.int("top_k", 0, minimum=0),
            top_k_indices=k.get("top_k_indices", str),
            top_k_probabilities=k.get("top_k_probabilities", str),
        )
        declared = {t.name: t for t in outputs}
        if classifier.logits not in declared:
            k.fail("logits", f"'{classifier.logits}' is not a declared output")
        if classifier.top_k and not (classifier.top_k_indices or classifier.top_k_probabilities):
            k.fail("top_k", "needs top_k_indices or top_k_probabilities to name an output")
        expected = {
            "probabilities": ("FP32", declared[classifier.logits].dims),
            "predictions": ("INT64", ()),
            "top_k_indices": ("INT64", (classifier.top_k,)),
            "top_k_probabilities": ("FP32", (classifier.top_k,)),
        }
        for key, (dtype, dims) in expected.items():
            out = getattr(classifier, key)
            if out is None:
                continue
            spec = declared.get(out)
            if spec is None:
                k.fail(key, f"'{out}' is not a declared output")
            if spec.datatype != dtype or spec.dims != dims:
                k.fail(key, f"output '{out}' must be declared {dtype} dims {list(dims)}, "
                       f"is {spec.datatype} dims {list(spec.dims)}")

    v = f.sub("version_policy")
    policy = VersionPolicy()
    if v is not None:
        v.check_keys({"latest", "all", "specific"})
        if len(v.data) != 1:
            v.fail("", "must have exactly one of latest, all, specific")
        if "latest" in v.data:
            policy = VersionPolicy("latest", num_versions=v.int("latest", minimum=1))
        elif "all" in v.data:
            if v.get("all", bool) is not True:
                v.fail("all", "must be true")
            policy = VersionPolicy("all")
        else:
            policy = VersionPolicy("specific", versions=v.int_list("specific", 1))

    default_version = f.get("default_version", (str, int), None)
    if default_version is not None:
        default_version = str(default_version)
        if not default_version.isdigit() or int(default_version) < 1:
            f.fail("default_version", f"must be a positive integer, got {default_version!r}")

    filename = f.get("model_filename", str, FORMATS[fmt][0])
    if "/" in filename or filename in ("", ".", ".."):
        f.fail("model_filename", f"must be a plain file name, got {filename!r}")

    routing = _routing(f.sub("routing"))
    compile_cfg = _compile(f.sub("compile"), fmt)
    precision = f.get("precision", str, "fp32")
    if precision not in PRECISIONS:
        f.fail("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and fmt not in _CASTABLE:
        f.fail("precision", f"{precision} cannot apply to an {fmt} model: a package runs at "
               "the precision it was compiled in (export it in that precision instead)")

    return ModelConfig(
        name=name,
        format=fmt,
        max_batch_size=max_batch,
        inputs=inputs,
        outputs=outputs,
        batching=batch_cfg,
        cache=cache_cfg,
        warmup=warm_cfg,
        classifier=classifier,
        version_policy=policy,
        default_version=default_version,
        cuda_graphs=f.get("cuda_graphs", bool, True),
        model_filename=filename,
        routing=routing,
        compile=compile_cfg,
        precision=precision,
    )


def _compile(c: _Fields | None, fmt: str) -> CompileConfig | None:
    """`compile`: {"mode": "default", "dynamic": false, "fallback": false}."""
    if c is None:
        return None
    c.check_keys({"mode", "dynamic", "fallback"})
    if fmt not in _COMPILABLE:
        c.fail("", f"torch.compile needs an eager module ({' or '.join(_COMPILABLE)} format), "
               f"not {fmt}" + (": export the model with torch.export instead"
                               if fmt == "torchscript" else ": it is compiled already"))
    defaults = CompileConfig()
    mode = c.get("mode", str, defaults.mode)
    if mode not in COMPILE_MODES:
        c.fail("mode", f"{mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return CompileConfig(mode=mode, dynamic=c.get("dynamic", bool, defaults.dynamic),
                         fallback=c.get("fallback", bool, defaults.fallback))


def _routing(r: _Fields | None) -> RoutingConfig | None:
    """`routing`: {"split": {"1": 90, "2": 10}, "shadow": {"3": 20}, "fallback": ["m:1", "m2"],
    "fallback_queue_us": N, "max_shadow_in_flight": N}. Versions are checked when served."""
    if r is None:
        return None
    r.check_keys({"split", "shadow", "fallback", "fallback_queue_us", "max_shadow_in_flight"})

    def weights(key: str, maximum: float | None) -> tuple[tuple[str, float], ...]:
        table = r.get(key, dict, {})
        out = []
        for version, weight in table.items():
            if not version.isdigit() or int(version) < 1:
                r.fail(key, f"{version!r} is not a version")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                r.fail(key, f"version {version}: weight must be a number >= 0, got {weight!r}")
            if maximum is not None and not 0 < weight <= maximum:
                r.fail(key, f"version {version}: percentage must be in (0, 100], got {weight!r}")
            out.append((str(int(version)), float(weight)))
        return tuple(out)

    split = weights("split", None)
    if split and sum(w for _v, w in split) <= 0:
        r.fail("split", "the weights sum to 0")
    fallback = r.get("fallback", list, [])
    for target in fallback:
        if not isinstance(target, str) or not target or target.count(":") > 1:
            r.fail("fallback", f"entries are \"model\" or \"model:version\", got {target!r}")
    return RoutingConfig(
        split=split,
        shadow=weights("shadow", 100.0),
        fallback=tuple(fallback),
        fallback_queue_us=r.int("fallback_queue_us", 0, minimum=0),
        max_shadow_in_flight=r.int("max_shadow_in_flight", 0, minimum=0),
    )


# ------------------------------------------------------------------------- repository


def check_model_name(name: str) -> str:
    """A model is named, never addressed by path: refuse anything that could escape."""
    if not _NAME_RE.match(name or "") or ".." in name:
        shown = repr(name[:64]) + (f"... ({len(name)} characters)" if len(name) > 64 else "")
        raise InvalidInput(
            f"invalid model name {shown}: use letters, digits, '_', '-' and '.' (at most "
            "128), never a path"
        )
    return name


class ModelRepository:
    """Reads configs and version folders under one root. Holds no state of its own."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ConfigError(f"model repository {self.root} is not a directory")

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and (p / CONFIG_FILE).is_file() and _NAME_RE.match(p.name)
        )

    def _model_dir(self, name: str) -> Path:
        check_model_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root or not (path / CONFIG_FILE).is_file():
            raise NotFound(f"model '{name}' is not in the model repository")
        return path

    def config(self, name: str) -> ModelConfig:
        path = self._model_dir(name) / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read: {e}") from None
        return parse_config(data, str(path), expected_name=name)

    def versions(self, name: str, config: ModelConfig | None = None) -> list[int]:
        """Versions present on disk: positive-integer folders holding the model file.
        config: the model's, when the caller has just read it (saves a parse)."""
        model_dir = self._model_dir(name)
        filename = (config or self.config(name)).model_filename
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / filename).is_file()
        )

    def missing_file(self, name: str, version: str = "", config: ModelConfig | None = None) -> str:
        """Why a version (or, without one, every version folder) holds no model: the file
        its format needs and the files found instead."""
        config = config or self.config(name)
        model_dir = self._model_dir(name)
        folders = [model_dir / str(version)] if version else sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
            key=lambda p: int(p.name))
        expected = (f"{config.format} model '{name}' needs the file "
                    f"'{config.model_filename}' in a version folder")
        if not folders:
            return f"{expected}; {model_dir} has no version folder (1/, 2/, ...)"
        found = []
        for folder in folders[:8]:
            files = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else None
            found.append(f"{folder.name}/ holds {', '.join(files) or 'nothing'}"
                         if files is not None else f"{folder.name}/ does not exist")
        return f"{expected}; {'; '.join(found)}"

    def served_versions(self, name: str) -> list[int]:
        return self.config(name).version_policy.select(self.versions(name))

    def default_version(self, name: str) -> str:
        config = self.config(name)
        served = config.version_policy.select(self.versions(name))
        if config.default_version is not None:
            return config.default_version
        if not served:
            raise NotFound(f"model '{name}' has no version to serve")
        return str(served[-1])

    def model_file(self, name: str, version: str) -> Path:
        if not str(version).isdigit():
            raise NotFound(f"model '{name}' has no version {version!r}")
        config = self.config(name)
        path = self._model_dir(name) / str(int(version)) / config.model_filename
        if not path.is_file():
            if not path.parent.is_dir():
                raise NotFound(f"model '{name}' has no version {version} ({path.parent} is missing)")
            raise FailedPrecondition(self.missing_file(name, str(int(version)), config))
        return path
