"""The JSON schema of ``OUT/manifest.json`` (written beside it as ``manifest.schema.json``)."""

from __future__ import annotations

from typing import Any

from factory.core.baselines import METHODS

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "peg-factory build manifest",
    "type": "object",
    "required": ["format_version", "ancestry", "learngene", "data", "recipe", "tools", "devices"],
    "properties": {
        "format_version": {"const": 1},
        "ancestry": {"type": "object", "required": ["spec", "sha256", "weights"]},
        "learngene": {"type": "object", "required": ["sha256", "layers", "heads", "sampled_once_for"]},
        "data": {"type": "object", "required": ["spec", "identity"]},
        "recipe": {"type": "object"},
        "tools": {"type": "object", "required": ["torch", "timm", "onnx", "onnxruntime"]},
        "devices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "profile", "profile_sha256", "status"],
                "properties": {
                    "status": {"enum": ["ok", "failed"]},
                    "error": {"type": "string"},
                    "shape": {
                        "type": "object",
                        "required": [
                            "depth",
                            "embed_dim",
                            "num_heads",
                            "mlp_ratio",
                            "img_size",
                            "patch_size",
                            "num_classes",
                        ],
                    },
                    "accuracy": {"type": "object", "required": ["val", "test"]},
                    "init": {"enum": list(METHODS)},
                    "init_requested": {"enum": ["auto", *METHODS]},
                    "init_decision": {
                        "type": "object",
                        "required": ["chosen", "reason", "knn_accuracy", "images", "seconds", "fraction_of_finetune"],
                    },
                    "latency_ms": {"type": "object", "required": ["predicted_target", "host_onnxruntime"]},
                    "margins": {"type": "object", "additionalProperties": {"type": "number"}},
                    "artifacts": {"type": "object", "additionalProperties": {"type": "object", "required": ["path"]}},
                },
                "if": {"properties": {"status": {"const": "ok"}}},
                "then": {
                    "required": [
                        "shape",
                        "init",
                        "learngene_sha256",
                        "finetune",
                        "accuracy",
                        "flops",
                        "params",
                        "latency_ms",
                        "memory_mb",
                        "margins",
                        "artifacts",
                        "model_card",
                    ]
                },
                "else": {"required": ["error"]},
            },
        },
    },
}
