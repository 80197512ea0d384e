"""Sample data for tests and demos: a Neuron compile-cache bucket and a tiny sharded checkpoint.

Everything is generated deterministically (seeded), so tests can assert on exact contents.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hffs_neuron.testing.emulator.hub import HubEmulator

COMPILER_VERSIONS = ("neuronxcc-2.21.18209.0+043b1bf7", "neuronxcc-2.19.8089.0+8ab9f450")


def _module_name(rng: random.Random) -> str:
    """A module directory name as libneuronxla writes it: MODULE_<20 digit graph hash>+<8 hex flags hash>."""
    return f"MODULE_{rng.randrange(10**19, 10**20)}+{rng.getrandbits(32):08x}"


def _module_files(rng: random.Random, neff_size: int) -> dict[str, bytes]:
    """The files of one successfully compiled module."""
    return {
        "model.hlo_module.pb": rng.randbytes(rng.randrange(2048, 16384)),
        "compile_flags.json": json.dumps(["--target=trn1", "--model-type=transformer", "-O1"]).encode(),
        "model.neff": rng.randbytes(neff_size),
        "model.done": b"",
    }


def build_neff_bucket(emulator: HubEmulator, bucket_id: str = "aws-neuron/optimum-neuron-cache") -> dict[str, Any]:
    """Create a bucket in the flat NEFF cache layout, including the poison real shared caches hold.

    Returns `neff_cache_layout()`'s description with "bucket_id" and "dir".
    """
    files, description = neff_cache_layout()
    directory = emulator.add_bucket(bucket_id, files)
    return {"bucket_id": bucket_id, "dir": directory, **description}


# optimum-neuron's registry of cached export configurations, as the model-repo cache holds it:
# neuronxcc-<version>/0_REGISTRY/<optimum-neuron version>/<model_type>/<org>/<name>/<hash>.json.
REGISTRY_ENTRIES = (
    # (compiler version, optimum-neuron version, model_type, checkpoint, task, batch, sequence, cores, cast)
    (COMPILER_VERSIONS[0], "0.4.1", "llama", "HFFS-Test/Tiny-Sharded", "text-generation", 1, 128, 2, "bf16"),
    (COMPILER_VERSIONS[0], "0.4.1", "llama", "HFFS-Test/Tiny-Sharded", "text-generation", 4, 4096, 8, "bf16"),
    (COMPILER_VERSIONS[1], "0.3.0", "llama", "HFFS-Test/Tiny-Sharded", "text-generation", 1, 2048, 2, "fp16"),
    (COMPILER_VERSIONS[0], "0.4.1", "bert", "HFFS-Test/Tiny-Bert", "feature-extraction", 8, 256, 1, "fp32"),
)


def registry_files(entries: tuple = REGISTRY_ENTRIES) -> dict[str, bytes]:
    """The registry json files of `entries` (each the model's config with a "neuron" section)."""
    files = {}
    for version, optimum, model_type, checkpoint, task, batch, sequence, cores, cast in entries:
        neuron = {
            "task": task,
            "batch_size": batch,
            "sequence_length": sequence,
            "num_cores": cores,
            "auto_cast_type": cast,
            "compiler_type": "neuronx-cc",
            "compiler_version": version.split("-", 1)[1],
            "checkpoint_id": checkpoint,
            "checkpoint_revision": "0123456789abcdef0123456789abcdef01234567",
        }
        body = json.dumps({"model_type": model_type, "neuron": neuron}, indent=2, sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()[:20]
        files[f"{version}/0_REGISTRY/{optimum}/{model_type}/{checkpoint}/{digest}.json"] = body
    return files


def build_neff_repo(emulator: HubEmulator, repo_id: str = "aws-neuron/optimum-neuron-cache") -> dict[str, Any]:
    """Commit the flat NEFF cache layout (poison included) and a registry to model repo `repo_id`, as the
    public optimum-neuron cache holds them. Returns `neff_cache_layout()`'s description (without the bucket's
    per-model area) with "repo_id", "commit", "data" ({path: bytes}) and "registry_files" (the registry's
    paths)."""
    files, description = neff_cache_layout()
    # The repo's model area is its registry: the bucket's per-model area is left out.
    area = tuple(description.pop("registry") + description.pop("exports"))
    files = {path: data for path, data in files.items() if not path.startswith(area)}
    registry = registry_files()
    files.update(registry)
    commit = emulator.add_repo(repo_id, files)
    return {"repo_id": repo_id, "commit": commit, "data": files, "registry_files": sorted(registry), **description}


def neff_cache_layout() -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of a NEFF cache in the flat layout, including the poison real shared caches hold.

    Per compiler version: complete modules (hlo + flags + neff + done), one poisoned module
    (``model.log`` and no neff), one module with a stale ``model.hlo_module.pb.lock``, plus the
    optimum-neuron per-model area and an export record. Returns ({path: bytes}, a description)::

        {"compiler_versions",
         "complete": [module dir, ...], "poisoned": [...], "locked": [...],
         "files": {path: size}, "registry": [per-model entry paths], "exports": [json paths]}

    Module dirs are bucket-relative, e.g. ``neuronxcc-2.21.18209.0+043b1bf7/MODULE_...+abcd1234``.
    """
    rng = random.Random(20240521)
    files: dict[str, bytes] = {}
    complete, poisoned, locked, registry, exports = [], [], [], [], []
    for version in COMPILER_VERSIONS:
        for i in range(3 if version == COMPILER_VERSIONS[0] else 2):
            module = f"{version}/{_module_name(rng)}"
            # Sizes from a few KiB to 1 MiB, so both tiny and multi-chunk transfers are exercised.
            neff_size = (4096, 300 * 1024, 1024 * 1024)[i]
            files.update({f"{module}/{name}": data for name, data in _module_files(rng, neff_size).items()})
            complete.append(module)
        bad = f"{version}/{_module_name(rng)}"
        files[f"{bad}/model.hlo_module.pb"] = rng.randbytes(4096)
        files[f"{bad}/compile_flags.json"] = b'["--target=trn1"]'
        files[f"{bad}/model.log"] = b"ERROR: compilation failed: internal compiler error\n"
        poisoned.append(bad)
        stale = f"{version}/{_module_name(rng)}"
        files[f"{stale}/model.hlo_module.pb"] = rng.randbytes(4096)
        files[f"{stale}/compile_flags.json"] = b'["--target=trn1"]'
        files[f"{stale}/model.hlo_module.pb.lock"] = b""
        locked.append(stale)
    # optimum-neuron's per-model registry points at a flat module by repeating its name.
    version, first = COMPILER_VERSIONS[0], complete[0].split("/", 1)[1]
    entry = f"{version}/HFFS-Test/Tiny-Sharded/text-generation/{first}"
    files[f"{entry}/model.hlo_module.pb"] = files[f"{complete[0]}/model.hlo_module.pb"]
    files[f"{entry}/compile_flags.json"] = files[f"{complete[0]}/compile_flags.json"]
    registry.append(entry)
    export = f"{version}/HFFS-Test/Tiny-Sharded/text-generation/exports/0.4.1/{rng.getrandbits(32):08x}.json"
    files[export] = json.dumps(
        {
            "model_id": "HFFS-Test/Tiny-Sharded",
            "task": "text-generation",
            "batch_size": 1,
            "sequence_length": 128,
            "num_cores": 2,
            "auto_cast_type": "bf16",
            "compiler_version": version.split("-", 1)[1],
        },
        indent=2,
    ).encode()
    exports.append(export)
    return files, {
        "compiler_versions": list(COMPILER_VERSIONS),
        "complete": complete,
        "poisoned": poisoned,
        "locked": locked,
        "registry": registry,
        "exports": exports,
        "files": {path: len(data) for path, data in files.items()},
    }


def build_sharded_model_repo(emulator: HubEmulator, repo_id: str = "HFFS-Test/Tiny-Sharded") -> dict[str, Any]:
    """Commit a tiny 3-shard safetensors checkpoint (built with numpy, no torch) to ``repo_id``.

    Returns ``{"repo_id", "commit", "files": {path: bytes}, "index": the parsed index json}``.
    """
    import numpy as np
    from safetensors.numpy import save

    gen = np.random.default_rng(7)
    hidden, layers, vocab = 64, 3, 256
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "torch_dtype": "float32",
    }
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(layers)]
    shards[0]["model.embed_tokens.weight"] = gen.standard_normal((vocab, hidden), dtype=np.float32)
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shards[layer][f"{prefix}.self_attn.q_proj.weight"] = gen.standard_normal((hidden, hidden), dtype=np.float32)
        shards[layer][f"{prefix}.mlp.up_proj.weight"] = gen.standard_normal((2 * hidden, hidden), dtype=np.float32)
        shards[layer][f"{prefix}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    shards[-1]["lm_head.weight"] = gen.standard_normal((vocab, hidden), dtype=np.float32)

    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{layers:05d}.safetensors"
        files[name] = save(tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    files["config.json"] = json.dumps(config, indent=2).encode()
    files["README.md"] = (
        b"---\nlicense: apache-2.0\n---\n# Tiny-Sharded\n\nA 3-shard test checkpoint for hffs-neuron.\n"
    )
    commit = emulator.add_repo(repo_id, files)
    return {"repo_id": repo_id, "commit": commit, "files": files, "index": index}
