"""The model's forward pass in ONNX Runtime, for HF detectors on CPU.

ONNX Runtime runs the default model 1.3x faster than eager PyTorch on CPU here (its graph
optimisations fuse convolutions with what follows them and run them in a blocked layout), with the
same boxes up to float rounding. The model is exported once per input shape (about 7 s for the
default model; actors that start together wait for the one exporting) and kept on disk, keyed by
everything the graph depends on, so later runs and other actors on the machine load it in under a
second; everything the key holds is read from files (`model_dir_identity`), so a detector that never
loads torch (detectors.onnx_detector) finds what an HFDetector exported.

An export is trusted only after it is checked: the exported graph and the PyTorch model run the same
random batch, at a batch size other than the one traced, and must agree. A model that fails to export
or to agree is recorded as such on disk (so later runs do not try again) and keeps PyTorch, with a
warning that says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from platescope.cache import cache_folder

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what is exported changes, so old cache entries are not reused
OPSET = 17
# Exported graph against PyTorch on the check batch (observed: 1e-5 on logits, 4e-7 on boxes).
LOGITS_ATOL = 1e-3
BOXES_ATOL = 1e-4
# torch's exporter keeps global state: two exports at once in one process break each other.
_EXPORTER = threading.Lock()


class OnnxUnavailable(RuntimeError):
    """This model cannot run in ONNX Runtime (export failed or disagreed with PyTorch); the message says why."""


def export_identity(weights: str, config: str, processor: str | None, *, trust_remote_code: bool) -> str:
    """Everything an exported graph depends on, as one string: the weights (by hash, or a hub commit), the
    model's and its processor's configs as saved (the processor decides which inputs the model gets),
    whether the model's own code ran, and the versions of the code that built and traced it."""
    from importlib import metadata

    def digest(text: str | None) -> str | None:
        return None if text is None else hashlib.sha256(text.encode()).hexdigest()

    return json.dumps({
        "format": FORMAT, "opset": OPSET, "weights": weights, "config": digest(config), "processor": digest(processor),
        "trust_remote_code": trust_remote_code, "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"),
    }, sort_keys=True)


def model_dir_identity(path: str, weights_hash: str, *, trust_remote_code: bool) -> str:
    """export_identity of a local model dir, from its files alone (no torch, no transformers)."""
    texts = []
    for name in ("config.json", "preprocessor_config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                texts.append(f.read())
        except FileNotFoundError:
            texts.append(None)
    return export_identity(weights_hash, texts[0] or "", texts[1], trust_remote_code=trust_remote_code)


def export_path(identity: str, pixel_shape: tuple[int, ...]) -> str:
    """Where the export of a model (its export_identity) for pixel_values of (channels, height, width) is
    kept. The other inputs' shapes follow from these two (the processor config is in the identity)."""
    digest = hashlib.sha256((identity + repr(tuple(int(d) for d in pixel_shape))).encode()).hexdigest()[:32]
    return os.path.join(cache_folder("onnx"), digest + ".onnx")


def failed_marker(path: str) -> str:
    """The file that records why the export at `path` could not be made or trusted."""
    return path + ".failed"


def load_session(path: str, num_threads: int | None) -> Any:
    """An ONNX Runtime session on the CPU for the graph at `path`, with `num_threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or 0  # 0: ONNX Runtime's default, all cores
    options.inter_op_num_threads = 1
    # Its threads sleep between ops rather than spin: decode tasks share these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


@dataclass
class ForwardOutput:
    """What post_process_object_detection reads from a model's output."""

    logits: Any
    pred_boxes: Any


class OnnxForward:
    """Callable like the model (`forward(pixel_values=..., pixel_mask=...)`) for the inputs it is given.

    One ONNX Runtime session per input shape (batch size aside), made on first use from the disk cache
    or by exporting `model` (a float32 CPU module, already folded: the graph is traced from it as it is).
    Where that fails, `model` itself runs from then on (`runtime` says which). Thread-safe: batch
    slices share a session, each running it on its own thread with `num_threads` ONNX Runtime threads.
    """

    def __init__(self, model: Any, identity: str, *, num_threads: int | None) -> None:
        self._model = model
        self._num_threads = num_threads
        self._identity = identity  # export_identity of the model
        self._sessions: dict[tuple, Any] = {}  # input shapes -> (session, the names of its graph inputs)
        self._lock = threading.Lock()
        self.runtime = "onnxruntime"

    def __call__(self, **inputs: Any) -> ForwardOutput:
        import torch

        names = tuple(sorted(inputs))
        key = (names, tuple(tuple(inputs[n].shape[1:]) for n in names))
        session = self._sessions.get(key)
        if session is None and self.runtime == "onnxruntime":
            with self._lock:  # slices of the first batch arrive together; one of them exports
                session = self._sessions.get(key)
                if session is None and self.runtime == "onnxruntime":
                    try:
                        session = self._sessions[key] = self._session(key, inputs)
                    except OnnxUnavailable as e:
                        log.warning("%s; the model runs in PyTorch", e)
                        self.runtime = "torch"
        if session is None:
            return self._model(**inputs)
        session, graph_inputs = session
        logits, boxes = session.run(["logits", "pred_boxes"], _feeds(graph_inputs, inputs))
        return ForwardOutput(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))

    def _session(self, key: tuple, inputs: dict[str, Any]) -> Any:
        if "pixel_values" not in inputs:
            raise OnnxUnavailable(f"{type(self._model).__name__}: exported by the shape of its pixel_values, "
                                  f"but it was given {sorted(inputs)}")
        path = export_path(self._identity, tuple(inputs["pixel_values"].shape[1:]))
        failed = failed_marker(path)
        if not os.path.exists(path) and not os.path.exists(failed):
            # One export per machine: the actors that start beside the exporting one wait for its file.
            with _exclusive(path + ".lock"):
                if not os.path.exists(path) and not os.path.exists(failed):
                    try:
                        self._export(path, inputs)
                    except OnnxUnavailable as e:
                        with contextlib.suppress(OSError):  # a cache it cannot write to: the warning says why
                            _write_atomically(failed, str(e).encode())
                        raise
        if os.path.exists(failed):
            with open(failed) as f:
                raise OnnxUnavailable(f"{f.read().strip()} (as found before: delete {failed} to try again)")
        try:
            session = load_session(path, self._num_threads)
            return session, [i.name for i in session.get_inputs()]  # read once, not per batch
        except Exception as e:  # noqa: BLE001 - e.g. a file that another ONNX Runtime version wrote
            raise OnnxUnavailable(f"{type(self._model).__name__}: {path} does not load: {type(e).__name__}: {e}") from e

    def _export(self, path: str, inputs: dict[str, Any]) -> None:
        """Trace the model on a batch of 2 shaped like `inputs`, check it on a batch of 3, then move it
        into place (so a file there is whole and checked)."""
        import torch

        names = sorted(inputs)
        model = self._model

        class Outputs(torch.nn.Module):  # the exporter wants a positional signature and plain outputs
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> tuple[Any, Any]:
                out = self.model(**dict(zip(names, args)))
                return out.logits, out.pred_boxes

        def example(batch: int, seed: int) -> list[Any]:
            generator = torch.Generator().manual_seed(seed)
            return [(torch.rand((batch, *inputs[n].shape[1:]), generator=generator) if inputs[n].is_floating_point()
                     else torch.ones((batch, *inputs[n].shape[1:]), dtype=inputs[n].dtype)) for n in names]

        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            import warnings

            os.makedirs(os.path.dirname(path), exist_ok=True)

            with _EXPORTER, torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings about Python values; the check decides
                torch.onnx.export(
                    Outputs().eval(), tuple(example(2, 0)), tmp, input_names=names,
                    output_names=["logits", "pred_boxes"], opset_version=OPSET, dynamo=False,
                    dynamic_axes={n: {0: "batch"} for n in names},
                )
            check = example(3, 1)
            with torch.no_grad():
                expected = model(**dict(zip(names, check)))
            exported = load_session(tmp, self._num_threads)
            got = exported.run(["logits", "pred_boxes"],
                               _feeds([i.name for i in exported.get_inputs()], dict(zip(names, check))))
        except Exception as e:  # noqa: BLE001 - any export failure means: keep PyTorch, say why
            _remove(tmp)
            raise OnnxUnavailable(f"{type(model).__name__}: export to ONNX failed: {type(e).__name__}: {e}") from e
        for name, want, have, atol in (("logits", expected.logits, got[0], LOGITS_ATOL),
                                       ("pred_boxes", expected.pred_boxes, got[1], BOXES_ATOL)):
            diff = float(np.abs(want.numpy() - have).max()) if want.shape == have.shape else float("inf")
            if not diff <= atol:
                _remove(tmp)
                raise OnnxUnavailable(f"{type(model).__name__}: the ONNX graph's {name} differ from PyTorch's "
                                      f"by {diff:.3g} (allowed {atol:g})")
        try:
            os.replace(tmp, path)
        except OSError as e:
            _remove(tmp)
            raise OnnxUnavailable(f"{type(model).__name__}: the export cannot be kept at {path}: {e}") from e
        log.info("exported %s to ONNX for inputs %s: %s", type(model).__name__,
                 {n: tuple(inputs[n].shape[1:]) for n in names}, path)


def _feeds(graph_inputs: list[str], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The inputs the graph takes, as NCHW arrays. A graph lacks the inputs its model ignores (RT-DETR
    takes a pixel_mask and does not read it), so an input it does not name is left out."""
    return {name: inputs[name].contiguous().numpy() for name in graph_inputs}


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """Holds an exclusive lock on lock_path across processes (released if the holder dies); where the
    lock file cannot be made, goes on without it (the export then fails and says why)."""
    import fcntl

    try:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        handle = open(lock_path, "a")  # noqa: SIM115 - closed below, after the lock is released
    except OSError:
        yield
        return
    with handle:  # closing releases the lock
        with contextlib.suppress(OSError):  # a file system without locks: exports may then overlap
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):  # absent, or its folder never made
        os.remove(path)
