"""Sample data for tests and demos: a Neuron compile-cache bucket and a tiny sharded checkpoint.

Everything is generated deterministically (seeded), so tests can assert on exact contents.
"""

from __future__ import annotations

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

    Per compiler version: complete modules (hlo + flags + neff + done), one poisoned module
    (``model.log`` and no neff), one module with a stale ``model.hlo_module.pb.lock``, plus the
    optimum-neuron per-model area and an export record. Returns a description::

        {"bucket_id", "dir", "compiler_versions",
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
    directory = emulator.add_bucket(bucket_id, files)
    return {
        "bucket_id": bucket_id,
        "dir": directory,
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
