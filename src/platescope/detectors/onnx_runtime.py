"""The model's forward pass in ONNX Runtime, for HF detectors on CPU.

ONNX Runtime runs the default model 1.3x faster than eager PyTorch on CPU here (its graph
optimisations fuse convolutions with what follows them and run them in a blocked layout), with the
same boxes up to float rounding. The model is exported once per input shape (about 7 s for the
default model; actors that start together wait for the one exporting) and kept on disk, keyed by
everything the graph depends on, so later runs and other actors on the machine load it in under a
second.

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

FORMAT = 1  # bump when what is exported changes, so old cache entries are not reused
OPSET = 17
# Exported graph against PyTorch on the check batch (observed: 1e-5 on logits, 4e-7 on boxes).
LOGITS_ATOL = 1e-3
BOXES_ATOL = 1e-4
# torch's exporter keeps global state: two exports at once in one process break each other.
_EXPORTER = threading.Lock()


class OnnxUnavailable(RuntimeError):
    """This model cannot run in ONNX Runtime (export failed or disagreed with PyTorch); the message says why."""


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

    def __init__(self, model: Any, model_id: str, *, num_threads: int | None) -> None:
        import onnxruntime as ort
        import torch
        import transformers

        self._model = model
        self._ort = ort
        self._num_threads = num_threads
        self._cache_dir = cache_folder("onnx")
        # The weights by their hash (a model_id is `<name>@<hash>`): the same model dir under another path
        # or from an s3:// copy finds the same export.
        self._identity = json.dumps({
            "format": FORMAT, "opset": OPSET, "weights": model_id.rpartition("@")[2], "class": type(model).__name__,
            "config": model.config.to_json_string(use_diff=False), "torch": torch.__version__,
            "transformers": transformers.__version__,
        }, sort_keys=True)
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
        digest = hashlib.sha256((self._identity + repr(key)).encode()).hexdigest()[:32]
        path = os.path.join(self._cache_dir, digest + ".onnx")
        failed = path + ".failed"
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
            session = self._load(path)
            return session, [i.name for i in session.get_inputs()]  # read once, not per batch
        except Exception as e:  # noqa: BLE001 - e.g. a file that another ONNX Runtime version wrote
            raise OnnxUnavailable(f"{type(self._model).__name__}: {path} does not load: {type(e).__name__}: {e}") from e

    def _load(self, path: str) -> Any:
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self._num_threads or 0  # 0: ONNX Runtime's default, all cores
        options.inter_op_num_threads = 1
        # Its threads sleep between ops rather than spin: decode tasks share these cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self._ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

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
            exported = self._load(tmp)
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
