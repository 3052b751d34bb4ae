"""The reference trainer plugin ``classifier``: a small CNN trained on the annotated regions (crops).

Each box is cut out of its image and brought to the model's input size with the very code the node runs before
inference (``models.preprocess.prepare``), so training and inference see identical tensors. The result is an ONNX
file and its OpenVINO IR (plus a .tflite when a PyTorch-to-LiteRT converter is installed), with the labels, the
input spec and a softmax decoder in the manifest. torch is imported only when a job runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from agent.jobs.base import JobError
from agent.trainer.plugins import EpochMetrics, PackageResult, TrainContext, TrainerPlugin, file_ref, write_manifest

if TYPE_CHECKING:
    import numpy as np

    from agent.trainer.annotations import Dataset

# Converters that turn a torch module into a .tflite (tried in this order); none is a dependency of cv-worker.
TFLITE_CONVERTERS = ("litert_torch", "ai_edge_torch")


class ClassifierOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, ge=8, le=512, description="Side of the square model input; crops are resized to it.")
    width: int = Field(16, ge=4, le=256, description="Channels of the first convolution (doubled twice after).")
    learning_rate: float = Field(3e-3, gt=0, le=1, description="Peak learning rate of the one-cycle schedule.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    top_k: int = Field(5, ge=1, le=1000, description="Classes the deployed model reports per image by default.")


def build_net(n_classes: int, width: int) -> Any:
    import torch.nn as nn

    def block(cin: int, cout: int) -> list[Any]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(3, w), nn.MaxPool2d(2),
        *block(w, 2 * w), nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, n_classes),
    )


def split_indices(labels: "np.ndarray", share: float, seed: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Stratified train/validation split: ``share`` of each class (none of a class with a single sample)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(math.floor(len(idx) * share)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class ClassifierPlugin(TrainerPlugin):
    name = "classifier"
    description = "Image classifier (small CNN) trained on the annotated regions; exports ONNX and OpenVINO IR."
    options_model = ClassifierOptions

    def train(self, data: "Dataset", options: Any, ctx: TrainContext) -> PackageResult:
        import numpy as np
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual torch spelling

        from models.manifest import InputSpec
        from models.preprocess import prepare

        opts: ClassifierOptions = options
        if len(data.labels) < 2:
            only = data.labels[0] if data.labels else "none"
            raise JobError("too_few_classes", f"a classifier needs at least 2 classes; the annotations have only "
                           f"{only!r}")
        if ctx.threads:
            torch.set_num_threads(ctx.threads)
        torch.manual_seed(ctx.seed)
        spec = InputSpec(width=opts.image_size, height=opts.image_size, layout="NCHW", dtype="float32",
                         color="RGB", mean=[127.5], std=[127.5], resize="stretch")
        index = data.class_index()
        xs = np.empty((len(data.samples), 3, spec.height, spec.width), dtype=np.float32)
        for i, s in enumerate(data.samples):
            if i % 256 == 0:
                ctx.check()
            xs[i] = prepare(data.crop(s), spec, "BGR")[0][0]
        ys = np.array([index[s.label] for s in data.samples], dtype=np.int64)
        tr, va = split_indices(ys, ctx.validation_split, ctx.seed)
        device = torch.device(ctx.device)
        x_all, y_all = torch.from_numpy(xs), torch.from_numpy(ys)
        if device.type == "cuda":
            x_all, y_all = x_all.to(device), y_all.to(device)
        net = build_net(len(data.labels), opts.width).to(device)
        steps = max(1, math.ceil(len(tr) / ctx.batch_size))
        opt = torch.optim.AdamW(net.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.learning_rate, total_steps=ctx.epochs * steps)
        gen = torch.Generator().manual_seed(ctx.seed)
        tr_t = torch.from_numpy(tr)
        val: Optional[EpochMetrics] = None
        train_loss = float("nan")
        for epoch in range(1, ctx.epochs + 1):
            net.train()
            order = tr_t[torch.randperm(len(tr_t), generator=gen)]
            total = 0.0
            for step in range(1, steps + 1):
                ctx.check()
                b = order[(step - 1) * ctx.batch_size: step * ctx.batch_size].to(x_all.device)
                loss = F.cross_entropy(net(x_all[b]), y_all[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
                train_loss = total / step
                if step < steps:
                    ctx.report(epoch, step, steps, train_loss)
            val = self._validate(net, x_all, y_all, va) if len(va) else None
            ctx.report(epoch, steps, steps, train_loss, val)
        ctx.phase("exporting")
        return self._export(net.cpu().eval(), data, spec, opts, ctx, train_loss, val, len(tr), len(va))

    @staticmethod
    def _validate(net: Any, x: Any, y: Any, idx: "np.ndarray") -> EpochMetrics:
        import torch
        import torch.nn.functional as F  # noqa: N812

        net.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(idx), 512):
                b = torch.from_numpy(idx[i:i + 512]).to(x.device)
                logits = net(x[b])
                loss_sum += float(F.cross_entropy(logits, y[b], reduction="sum"))
                correct += int((logits.argmax(1) == y[b]).sum())
        return EpochMetrics(loss=loss_sum / len(idx), accuracy=correct / len(idx))

    def _export(self, net: Any, data: "Dataset", spec: Any, opts: ClassifierOptions, ctx: TrainContext,
                train_loss: float, val: Optional[EpochMetrics], n_train: int, n_val: int) -> PackageResult:
        from accelerators.openvino_backend import block_openvino_telemetry

        block_openvino_telemetry()
        import openvino as ov
        import torch

        pkg = ctx.package_dir
        example = torch.zeros(1, 3, spec.height, spec.width)
        torch.onnx.export(net, (example,), str(pkg / "model.onnx"), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False)
        ctx.check()
        ov_model = ov.convert_model(str(pkg / "model.onnx"))
        ov.save_model(ov_model, str(pkg / "model.xml"), compress_to_fp16=False)
        files: dict[str, Any] = {
            "onnx": file_ref(pkg, "model.onnx"),
            "openvino": {**file_ref(pkg, "model.xml"), "weights": file_ref(pkg, "model.bin")},
        }
        skipped: dict[str, str] = {}
        reason = export_tflite(net, example, pkg / "model.tflite")
        if reason is None:
            files["tflite"] = file_ref(pkg, "model.tflite")
        else:
            skipped["tflite"] = reason
        metrics: dict[str, Any] = {"train_samples": n_train, "val_samples": n_val, "train_loss": round(train_loss, 5)}
        if val is not None:
            metrics.update(val_loss=round(val.loss or 0.0, 5), val_accuracy=round(val.accuracy or 0.0, 5))
        write_manifest(pkg, {
            "schema_version": 1, "name": ctx.name, "version": ctx.version, "task": "classification",
            "description": f"{len(data.labels)}-class classifier trained by cv-worker ({self.name} plugin) on "
                           f"{len(data.samples)} annotated regions",
            "files": files,
            "input": spec.model_dump(exclude_none=True),
            "decoder": {"type": "softmax", "top_k": min(opts.top_k, len(data.labels)), "apply_softmax": True},
            "labels": list(data.labels),
            "source": {"trainer": "cv-worker", "plugin": self.name, "job_id": ctx.job_id, "annotations": data.source,
                       "epochs": ctx.epochs, "batch_size": ctx.batch_size, "device": ctx.device,
                       "options": opts.model_dump(), "metrics": metrics},
        })
        return PackageResult(pkg, metrics, skipped)


def export_tflite(net: Any, example: Any, path: Path) -> Optional[str]:
    """Write a .tflite with the first converter installed; the reason it was skipped otherwise."""
    for name in TFLITE_CONVERTERS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            conv = importlib.import_module(name)
            conv.convert(net, (example,)).export(str(path))
            return None
        except Exception as e:  # a converter that fails on this model must not lose the other formats
            path.unlink(missing_ok=True)
            return f"{name} could not convert the model: {type(e).__name__}: {e}"
    return "no PyTorch-to-LiteRT converter is installed on the build peer (e.g. pip install litert-torch)"
