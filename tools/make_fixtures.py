#!/usr/bin/env python3
"""Generate (and cross-check) the PyTorch / transformers / PEFT parity fixtures for tapelora.

This script is run BY HAND, never by CI. CI only reads the files it wrote into
``tests/fixtures/`` (they are committed). It needs torch, transformers, peft,
safetensors and numpy, e.g.::

    python3 -m venv /work/venv-fixtures
    /work/venv-fixtures/bin/pip install torch transformers peft safetensors numpy
    /work/venv-fixtures/bin/python tools/make_fixtures.py

The committed fixtures were produced with:

    python 3.11.7, torch 2.15.0 (+cu132 PyPI wheel, run on CPU), transformers 5.24.0,
    peft 0.21.2, safetensors 0.8.0, numpy 2.4.6

Modes
-----
``python tools/make_fixtures.py``
    (Re)write every fixture under ``tests/fixtures/`` (see ``tests/fixtures/README.md``):

    * ``gpt2-tiny/``                 tiny random GPT-2 (HF ``save_pretrained`` folder) +
                                     ``reference.safetensors`` (logits, loss, every grad)
    * ``gpt2-tiny-lora/``            PEFT LoRA adapter (r=4, alpha=12, c_attn/c_proj/c_fc) +
                                     ``reference.safetensors`` (logits, loss, LoRA grads, merged logits)
    * ``gpt2-tiny-lora-rslora/``     PEFT rsLoRA adapter (r=2, alpha=5, c_attn, layer 1 only) +
                                     ``reference.safetensors`` (logits, loss)

    Everything is deterministic: fixed seeds, single CPU thread, float64 reference math.

``python tools/make_fixtures.py --check-model DIR``
    Load a tapelora-written HF GPT-2 folder with ``GPT2LMHeadModel.from_pretrained(DIR)``,
    run it on ``DIR/tapelora_reference.safetensors["tokens"]`` and compare with its
    ``logits`` (and ``loss`` if ``targets`` + ``loss`` are present). Exit status 1 when
    any weight is missing/unexpected or the relative difference exceeds 1e-4.

``python tools/make_fixtures.py --check-adapter BASE_DIR ADAPTER_DIR``
    Same, for ``PeftModel.from_pretrained(base, ADAPTER_DIR)`` against
    ``ADAPTER_DIR/tapelora_reference.safetensors``. Also fails when the adapter file's
    keys do not exactly match the LoRA parameters PEFT created (PEFT itself only warns).

``python tools/make_fixtures.py --self-test``
    Exercise the two check modes on temporary copies of the committed fixtures
    (one matching reference -> must pass, one perturbed reference -> must fail).

"Relative difference" in the check modes is ``max|ours - ref| / max|ref|`` over the
whole logits tensor (normalising by the tensor's scale, not element-wise, so logits
close to zero do not blow the ratio up). The reference model always runs in float64.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Never touch the network: everything here is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch
    import torch.nn.functional as F
    import transformers
    import peft
    import safetensors
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError as exc:  # pragma: no cover - only hit on a machine without the deps
    sys.exit(
        f"make_fixtures.py needs torch, transformers, peft, safetensors: {exc}\n"
        "  python3 -m venv /work/venv-fixtures && "
        "/work/venv-fixtures/bin/pip install torch transformers peft safetensors numpy"
    )

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"

BASE_DIR_NAME = "gpt2-tiny"
LORA_DIR_NAME = "gpt2-tiny-lora"
RSLORA_DIR_NAME = "gpt2-tiny-lora-rslora"
REFERENCE_NAME = "reference.safetensors"
TAPELORA_REFERENCE_NAME = "tapelora_reference.safetensors"

# Tiny GPT-2 with deliberately odd sizes (no dimension equals another by accident).
VOCAB = 67
N_POSITIONS = 19
N_EMBD = 30
N_HEAD = 3
N_LAYER = 2

# Reference batch.
BATCH = 2
SEQ = 7
IGNORE_INDEX = -100

# Seeds (one per random stream, so changing one fixture does not shift the others).
SEED_INIT = 0  # GPT2LMHeadModel(config) weight init (global RNG)
SEED_PERTURB = 1  # LayerNorm / bias perturbation
SEED_BATCH = 2  # tokens / targets
SEED_LORA = 3  # LoRA A/B values of gpt2-tiny-lora
SEED_RSLORA = 4  # LoRA A/B values of gpt2-tiny-lora-rslora

REL_TOL = 1e-4  # check modes: allowed max|ours-ref| / max|ref|

LORA_KWARGS = dict(
    r=4,
    lora_alpha=12,
    target_modules=["c_attn", "c_proj", "c_fc"],
    lora_dropout=0.0,
    bias="none",
    fan_in_fan_out=True,
    task_type="CAUSAL_LM",
)
RSLORA_KWARGS = dict(
    r=2,
    lora_alpha=5,
    use_rslora=True,
    target_modules=["c_attn"],
    layers_to_transform=[1],
    lora_dropout=0.0,
    bias="none",
    fan_in_fan_out=True,
    task_type="CAUSAL_LM",
)


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def metadata(description: str) -> dict[str, str]:
    """String metadata stored in the header of every reference.safetensors.

    safetensors writes ``__metadata__`` from a hash map, so several keys come out in a
    random order; a single key holding sorted JSON keeps the files byte-identical
    between runs."""
    info = {"generator": "tools/make_fixtures.py", "description": description, **versions()}
    return {"fixture": json.dumps(info, sort_keys=True)}


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------


def save_hf_model(model: GPT2LMHeadModel, out_dir: Path) -> None:
    """``save_pretrained`` with safetensors (transformers 5 always uses safetensors and
    dropped the ``safe_serialization`` argument; older versions need it)."""
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(out_dir), **kwargs)


def load_hf_model(model_dir: Path, strict: bool = True) -> GPT2LMHeadModel:
    """Load a GPT-2 folder as float32 weights with the plain ("eager") attention code.

    With ``strict`` any missing / unexpected / mismatched key is an error: transformers
    would otherwise silently random-initialise missing weights.
    """
    model, info = GPT2LMHeadModel.from_pretrained(
        str(model_dir),
        attn_implementation="eager",
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        msg = f"loading {model_dir}: {problems}"
        if strict:
            raise SystemExit(f"FAIL {msg}")
        print(f"warning: {msg}")
    model.eval()
    return model


def forward_loss(model, tokens: torch.Tensor, targets: torch.Tensor | None):
    """logits [B,T,V] and mean cross-entropy over targets != -100 (no shifting)."""
    logits = model(input_ids=tokens).logits
    loss = None
    if targets is not None:
        vocab = logits.shape[-1]
        loss = F.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
    return logits, loss


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed tokens [2,7] and (independent, NOT shifted) targets [2,7], int64."""
    g = torch.Generator().manual_seed(SEED_BATCH)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    targets[1, SEQ - 1] = IGNORE_INDEX  # exercise ignore_index
    return tokens, targets


def lora_param_key(param_name: str, adapter_name: str = "default") -> str:
    """PEFT parameter name -> key in adapter_model.safetensors (adapter name removed,
    exactly like peft.utils.get_peft_model_state_dict does)."""
    return param_name.replace(f".{adapter_name}", "")


def lora_params_by_key(peft_model) -> dict[str, torch.nn.Parameter]:
    return {
        lora_param_key(n): p for n, p in peft_model.named_parameters() if "lora_" in n
    }


def safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def as_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).contiguous().clone()


# --------------------------------------------------------------------------------------
# fixture 1+2: tiny GPT-2 and its reference
# --------------------------------------------------------------------------------------


def make_base_model(out_dir: Path) -> None:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_head=N_HEAD,
        n_layer=N_LAYER,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.2,  # 10x default, so activations are not all tiny
        bos_token_id=VOCAB - 1,  # default 50256 would be out of range for vocab 67
        eos_token_id=VOCAB - 1,
    )
    torch.manual_seed(SEED_INIT)
    model = GPT2LMHeadModel(config).float().eval()

    # Move every LayerNorm weight/bias and every Conv1D/Linear bias off its init value
    # (1, 0, 0), so a port that ignores one of them cannot pass by accident.
    g = torch.Generator().manual_seed(SEED_PERTURB)
    with torch.no_grad():
        for _name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=g))
            elif isinstance(module, (Conv1D, torch.nn.Linear)) and module.bias is not None:
                module.bias.add_(0.05 * torch.randn(module.bias.shape, generator=g))

    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head must be tied to wte"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(model, out_dir)


def make_base_reference(model_dir: Path, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    """float64 logits / loss / d loss / d param for the f32 weights exactly as saved."""
    model = load_hf_model(model_dir).double()
    weight_keys = safetensors_keys(model_dir / "model.safetensors")

    # Every trainable parameter must appear exactly once in model.safetensors (the tied
    # lm_head.weight is the same Parameter object as transformer.wte.weight).
    params = {k: model.get_parameter(k) for k in weight_keys}
    saved_ids = {id(p) for p in params.values()}
    all_ids = {id(p) for p in model.parameters()}
    assert saved_ids == all_ids, "model.safetensors keys do not cover every parameter"

    model.zero_grad(set_to_none=True)
    logits, loss = forward_loss(model, tokens, targets)
    loss.backward()

    tensors = {
        "tokens": tokens.clone(),
        "targets": targets.clone(),
        "logits": as_f64(logits),
        "loss": as_f64(loss).reshape(1),
    }
    for key, p in params.items():
        assert p.grad is not None, f"no gradient for {key}"
        tensors[f"grad.{key}"] = as_f64(p.grad)
    save_file(
        tensors,
        str(model_dir / REFERENCE_NAME),
        metadata=metadata(
            "gpt2-tiny float64 reference: logits[B,T,V], loss[1] = mean CE over targets!=-100 "
            "(no shift), grad.<model.safetensors key> = d loss / d param"
        ),
    )


# --------------------------------------------------------------------------------------
# fixtures 3+4: LoRA adapters and their references
# --------------------------------------------------------------------------------------


def make_adapter(base_dir: Path, out_dir: Path, lora_kwargs: dict, seed: int) -> None:
    base = load_hf_model(base_dir)
    peft_model = get_peft_model(base, LoraConfig(**lora_kwargs))
    # Relative name instead of the absolute path of the folder the base was loaded from.
    peft_model.peft_config["default"].base_model_name_or_path = BASE_DIR_NAME

    # PEFT initialises lora_B to zero (adapter = identity); make A and B non-trivial.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))

    if out_dir.exists():
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(str(out_dir))
    # PEFT also writes a boilerplate model-card README.md; it holds nothing we need.
    card = out_dir / "README.md"
    if card.exists():
        card.unlink()
    # PEFT stores target_modules as a Python set, so its order in adapter_config.json
    # depends on PYTHONHASHSEED. Sort it so regenerating gives byte-identical files
    # (same formatting PEFT uses: indent=2, sort_keys=True, no trailing newline).
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_adapter_model(base_dir: Path, adapter_dir: Path, trainable: bool):
    """Base (f32 as saved) + adapter, checked key-for-key, then converted to float64."""
    base = load_hf_model(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    file_keys = set(safetensors_keys(adapter_dir / "adapter_model.safetensors"))
    model_keys = set(lora_params_by_key(model))
    if file_keys != model_keys:
        raise SystemExit(
            f"FAIL adapter keys of {adapter_dir} do not match the LoRA parameters PEFT made:\n"
            f"  only in file : {sorted(file_keys - model_keys)}\n"
            f"  only in model: {sorted(model_keys - file_keys)}"
        )
    return model.double().eval()


def make_adapter_reference(
    base_dir: Path,
    adapter_dir: Path,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    with_grads: bool,
    description: str,
) -> None:
    model = load_adapter_model(base_dir, adapter_dir, trainable=True)
    model.zero_grad(set_to_none=True)
    logits, loss = forward_loss(model, tokens, targets)

    tensors = {
        "tokens": tokens.clone(),
        "targets": targets.clone(),
        "logits": as_f64(logits),
        "loss": as_f64(loss).reshape(1),
    }
    if with_grads:
        loss.backward()
        for key, p in lora_params_by_key(model).items():
            assert p.grad is not None, f"no gradient for {key}"
            tensors[f"grad.{key}"] = as_f64(p.grad)
        # Base weights must have stayed frozen.
        for n, p in model.named_parameters():
            if "lora_" not in n:
                assert p.grad is None, f"base parameter {n} got a gradient"

        merged = model.merge_and_unload()
        with torch.no_grad():
            merged_logits, _ = forward_loss(merged, tokens, None)
        tensors["merged_logits"] = as_f64(merged_logits)
        diff = (merged_logits - logits.detach()).abs().max().item()
        assert diff < 1e-10, f"merge_and_unload changed logits by {diff}"

    save_file(tensors, str(adapter_dir / REFERENCE_NAME), metadata=metadata(description))


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------


def describe_file(path: Path) -> list[str]:
    lines = []
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            lines.append(f"| `{k}` | {sl.get_dtype()} | {list(sl.get_shape())} |")
    return lines


def write_readme() -> None:
    v = versions()
    base = FIXTURES / BASE_DIR_NAME
    lora = FIXTURES / LORA_DIR_NAME
    rslora = FIXTURES / RSLORA_DIR_NAME

    def sizes(d: Path) -> list[str]:
        return [f"| `{d.name}/{p.name}` | {p.stat().st_size} |" for p in sorted(d.iterdir())]

    def tensor_table(path: Path, only_non_grad: bool = False) -> list[str]:
        rows = describe_file(path)
        if only_non_grad:
            rows = [r for r in rows if not r.startswith("| `grad.")]
        return ["| key | dtype | shape |", "| --- | --- | --- |", *rows]

    lora_cfg = json.loads((lora / "adapter_config.json").read_text())
    rs_cfg = json.loads((rslora / "adapter_config.json").read_text())

    text = f"""# Parity fixtures (PyTorch / transformers / PEFT)

Generated by `tools/make_fixtures.py` (run by hand, never by CI; CI only reads these files).
Regenerate with:

```sh
python3 -m venv /work/venv-fixtures
/work/venv-fixtures/bin/pip install torch transformers peft safetensors numpy
/work/venv-fixtures/bin/python tools/make_fixtures.py            # rewrites tests/fixtures/*
/work/venv-fixtures/bin/python tools/make_fixtures.py --self-test  # exercises the check modes
```

Made with: python {v['python']}, torch {v['torch']} (CPU), transformers {v['transformers']},
peft {v['peft']}, safetensors {v['safetensors']}. Single CPU thread, fixed seeds
(init {SEED_INIT}, perturbation {SEED_PERTURB}, batch {SEED_BATCH}, LoRA {SEED_LORA},
rsLoRA {SEED_RSLORA}); regenerating with other versions may change the random values
(and therefore every number), but not the layout.

## `{BASE_DIR_NAME}/` — tiny random GPT-2 (HF `save_pretrained` folder)

`GPT2LMHeadModel` with vocab_size={VOCAB}, n_positions={N_POSITIONS}, n_embd={N_EMBD},
n_head={N_HEAD} (head dim {N_EMBD // N_HEAD}), n_layer={N_LAYER}, n_inner=null (= 4*n_embd =
{4 * N_EMBD}), activation_function="gelu_new" (tanh approximation), layer_norm_epsilon=1e-5,
all dropouts 0, initializer_range=0.2, bos/eos token id {VOCAB - 1}, tied `lm_head` =
`transformer.wte`. After init, every LayerNorm weight and bias got `+ N(0, 0.1)` noise and
every Conv1D bias `+ N(0, 0.05)` noise, so no parameter sits at its init value (1 / 0 / 0).

* `config.json`, `generation_config.json` — exactly as transformers wrote them.
* `model.safetensors` — float32 weights as written by transformers. HF Conv1D layout: the
  weight is `[in, out]` and the layer computes `x @ W + b`. `lm_head.weight` is NOT stored
  (tied to `transformer.wte.weight`), and there are no `attn.bias` / `attn.masked_bias` buffers.

```
{chr(10).join(f"{k}  {t}  {s}" for k, t, s in _keys_dtypes_shapes(base / "model.safetensors"))}
```

* `reference.safetensors` — computed in **float64** from the float32 weights as saved
  (reloaded with `from_pretrained`, then `.double()`, eager attention):
  * `tokens` I64 [{BATCH},{SEQ}], values in [0,{VOCAB}).
  * `targets` I64 [{BATCH},{SEQ}] — an independent random tensor (NOT tokens shifted), with
    `targets[1,{SEQ - 1}] = {IGNORE_INDEX}` to exercise `ignore_index`.
  * `logits` F64 [{BATCH},{SEQ},{VOCAB}] = `model(input_ids=tokens).logits` (no attention mask).
  * `loss` F64 [1] = `F.cross_entropy(logits.view(-1,V), targets.view(-1), ignore_index=-100)`,
    i.e. the mean over the {BATCH * SEQ - 1} non-ignored positions, no shifting.
  * `grad.<key>` F64, same shape as the weight, for every `<key>` of `model.safetensors`:
    d loss / d weight. `grad.transformer.wte.weight` includes both uses (embedding and the
    tied lm_head).

{chr(10).join(tensor_table(base / REFERENCE_NAME, only_non_grad=True))}

## `{LORA_DIR_NAME}/` — PEFT LoRA adapter for `{BASE_DIR_NAME}`

`get_peft_model(base, LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn","c_proj","c_fc"],
lora_dropout=0.0, bias="none", fan_in_fan_out=True, task_type="CAUSAL_LM"))` (so both
`attn.c_proj` and `mlp.c_proj` are adapted), then every `lora_A` / `lora_B` weight set to
`N(0, 0.1)` (PEFT's default lora_B = 0 would make the adapter a no-op); saved with
`save_pretrained` (PEFT's boilerplate model-card `README.md` is deleted).
Scaling = lora_alpha / r = 3. For a Conv1D base layer with in/out features:
`lora_A.weight` is `[r, in]`, `lora_B.weight` is `[out, r]` (plain nn.Linear layout, NOT
transposed despite fan_in_fan_out), and `y = x @ W + b + scaling * (x @ A^T) @ B^T`; the
merged Conv1D weight is `W + scaling * (B @ A)^T`.

* `adapter_config.json` — as PEFT wrote it (`base_model_name_or_path` set to "{lora_cfg.get('base_model_name_or_path')}").
* `adapter_model.safetensors` — float32, keys (adapter name `default` removed):

```
{chr(10).join(f"{k}  {t}  {s}" for k, t, s in _keys_dtypes_shapes(lora / "adapter_model.safetensors"))}
```

* `reference.safetensors` — float64 math (base f32 weights + adapter f32 weights, `.double()`):
  `tokens`, `targets` (same as above), `logits` F64 [{BATCH},{SEQ},{VOCAB}], `loss` F64 [1],
  `grad.<key>` F64 for every key of `adapter_model.safetensors` (base weights frozen, so no
  base grads), and `merged_logits` F64 [{BATCH},{SEQ},{VOCAB}] = logits after
  `merge_and_unload()` (equal to `logits` to ~1e-15).

{chr(10).join(tensor_table(lora / REFERENCE_NAME, only_non_grad=True))}

## `{RSLORA_DIR_NAME}/` — PEFT rsLoRA adapter for `{BASE_DIR_NAME}`

`LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["c_attn"],
layers_to_transform=[1], lora_dropout=0.0, bias="none", fan_in_fan_out=True,
task_type="CAUSAL_LM")` — only `transformer.h.1.attn.c_attn` is adapted; scaling =
lora_alpha / sqrt(r) = 5/sqrt(2). A/B set to `N(0, 0.1)`. `layers_pattern` is
{json.dumps(rs_cfg.get('layers_pattern'))} in the config (PEFT matches the number after `.h.`).

```
{chr(10).join(f"{k}  {t}  {s}" for k, t, s in _keys_dtypes_shapes(rslora / "adapter_model.safetensors"))}
```

* `reference.safetensors`: `tokens`, `targets`, `logits` F64 [{BATCH},{SEQ},{VOCAB}], `loss` F64 [1].

## Sizes (bytes)

| file | bytes |
| --- | --- |
{chr(10).join(sizes(base) + sizes(lora) + sizes(rslora))}

## Checking tapelora-written folders against transformers / PEFT

```sh
# DIR: a tapelora-written HF GPT-2 folder plus DIR/tapelora_reference.safetensors
#      holding `tokens` I64 [B,T] and tapelora's `logits` F32/F64 [B,T,V]
#      (optionally `targets` I64 [B,T] + `loss` [1] or [] to compare the loss as well).
python tools/make_fixtures.py --check-model DIR
# same for a tapelora-written PEFT adapter; the reference file lives in ADAPTER_DIR.
python tools/make_fixtures.py --check-adapter BASE_DIR ADAPTER_DIR
```

Both print max abs and relative (`max|diff| / max|ref logits|`) differences and exit 1 if the
relative difference is above {REL_TOL:g}, or if transformers reports missing/unexpected weight
keys, or if the adapter's keys do not exactly match the LoRA parameters PEFT creates.

## The reverse direction, committed: `tapelora-qv-adapter/`

Written by tapelora (`cargo run --release --example write_adapter_reference -- tests/fixtures/tapelora-qv-adapter`):
LoRA r=3, alpha=7 on the q and v slices of c_attn — exported as a zero-padded rank-6 c_attn
adapter with alpha 14 so the scale stays 7/3 — plus c_fc at r=2, alpha=5 (rank_pattern /
alpha_pattern). `tapelora_reference.safetensors` holds tapelora's logits before export;
`peft_reference.safetensors` holds PEFT's float64 logits for the same tokens, written by
`python tools/make_fixtures.py --peft-logits tests/fixtures/gpt2-tiny tests/fixtures/tapelora-qv-adapter`.
`cargo test` checks that both agree with tapelora reading the folder back.
"""
    (FIXTURES / "README.md").write_text(text)


def _keys_dtypes_shapes(path: Path):
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            yield k, sl.get_dtype(), list(sl.get_shape())


# --------------------------------------------------------------------------------------
# check modes
# --------------------------------------------------------------------------------------


def compare_with_reference(model, ref_path: Path, label: str) -> bool:
    if not ref_path.exists():
        raise SystemExit(f"FAIL {ref_path} not found")
    ref = load_file(str(ref_path))
    for k in ("tokens", "logits"):
        if k not in ref:
            raise SystemExit(f"FAIL {ref_path} has no `{k}` tensor (keys: {sorted(ref)})")
    tokens = ref["tokens"].to(torch.int64)
    ref_logits = ref["logits"].to(torch.float64)
    targets = ref["targets"].to(torch.int64) if "targets" in ref else None

    with torch.no_grad():
        logits, loss = forward_loss(model, tokens, targets)
    if tuple(logits.shape) != tuple(ref_logits.shape):
        print(f"FAIL {label}: logits shape {list(logits.shape)} != reference {list(ref_logits.shape)}")
        return False

    diff = (logits - ref_logits).abs()
    max_abs = diff.max().item()
    scale = ref_logits.abs().max().item()
    rel = max_abs / max(scale, 1e-30)
    ok = rel <= REL_TOL
    print(
        f"{label}: logits {list(ref_logits.shape)} ({ref['logits'].dtype}) "
        f"max_abs_diff={max_abs:.3e} max|ref|={scale:.3e} rel_diff={rel:.3e} "
        f"-> {'OK' if ok else 'FAIL'} (tol {REL_TOL:g})"
    )
    if loss is not None and "loss" in ref:
        ref_loss = ref["loss"].to(torch.float64).reshape(-1)[0].item()
        loss_abs = abs(loss.item() - ref_loss)
        loss_rel = loss_abs / max(abs(ref_loss), 1e-30)
        loss_ok = loss_rel <= REL_TOL
        print(
            f"{label}: loss ours={loss.item():.10f} ref={ref_loss:.10f} "
            f"abs_diff={loss_abs:.3e} rel_diff={loss_rel:.3e} -> {'OK' if loss_ok else 'FAIL'}"
        )
        ok = ok and loss_ok
    return ok


def check_model(model_dir: Path) -> int:
    model = load_hf_model(model_dir).double()
    ok = compare_with_reference(model, model_dir / TAPELORA_REFERENCE_NAME, f"check-model {model_dir}")
    return 0 if ok else 1


def check_adapter(base_dir: Path, adapter_dir: Path) -> int:
    model = load_adapter_model(base_dir, adapter_dir, trainable=False)
    ok = compare_with_reference(
        model, adapter_dir / TAPELORA_REFERENCE_NAME, f"check-adapter {adapter_dir}"
    )
    return 0 if ok else 1


def peft_logits(base_dir: Path, adapter_dir: Path) -> int:
    """Run PEFT on the tokens of ADAPTER_DIR/tapelora_reference.safetensors (an adapter written
    by tapelora) and write PEFT's float64 logits to ADAPTER_DIR/peft_reference.safetensors, so
    that `cargo test` can prove PEFT reads tapelora's file exactly as tapelora does."""
    model = load_adapter_model(base_dir, adapter_dir, trainable=False)
    ref = load_file(str(adapter_dir / TAPELORA_REFERENCE_NAME))
    tokens = ref["tokens"].to(torch.int64)
    with torch.no_grad():
        logits, _ = forward_loss(model, tokens, None)
    out = adapter_dir / "peft_reference.safetensors"
    save_file({"tokens": tokens, "logits": logits.to(torch.float64).contiguous()}, str(out),
              metadata={"fixture": json.dumps({"what": "PEFT logits of a tapelora-written adapter"})})
    print(f"wrote {out}")
    return 0


def self_test() -> int:
    """Run --check-model / --check-adapter (as subprocesses, like a person would) on
    temporary copies of the committed fixtures: matching f32 logits must pass,
    logits off by 1e-2 * max|logits| must fail."""
    import subprocess

    failures = 0
    with tempfile.TemporaryDirectory(prefix="tapelora-fixture-check-") as tmp:
        tmp = Path(tmp)
        base = tmp / BASE_DIR_NAME
        adapter = tmp / LORA_DIR_NAME
        shutil.copytree(FIXTURES / BASE_DIR_NAME, base)
        shutil.copytree(FIXTURES / LORA_DIR_NAME, adapter)
        cases = [
            (base, ["--check-model", str(base)]),
            (adapter, ["--check-adapter", str(base), str(adapter)]),
        ]
        for folder, args in cases:
            ref = load_file(str(folder / REFERENCE_NAME))
            for perturb, want_rc in ((False, 0), (True, 1)):
                logits = ref["logits"].to(torch.float32)  # tapelora would write f32
                if perturb:
                    logits = logits.clone()
                    logits[0, 0, 0] += 1e-2 * logits.abs().max()
                save_file(
                    {"tokens": ref["tokens"], "targets": ref["targets"],
                     "logits": logits.contiguous(), "loss": ref["loss"].to(torch.float32)},
                    str(folder / TAPELORA_REFERENCE_NAME),
                )
                rc = subprocess.run([sys.executable, __file__, *args]).returncode
                status = "ok" if rc == want_rc else "UNEXPECTED"
                print(f"self-test {args[0]} perturbed={perturb}: exit {rc} (want {want_rc}) {status}")
                failures += rc != want_rc
    print("self-test:", "PASSED" if failures == 0 else f"{failures} FAILED")
    return 0 if failures == 0 else 1


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def generate() -> int:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    base_dir = FIXTURES / BASE_DIR_NAME
    if base_dir.exists():
        shutil.rmtree(base_dir)

    tokens, targets = make_batch()

    make_base_model(base_dir)
    make_base_reference(base_dir, tokens, targets)

    lora_dir = FIXTURES / LORA_DIR_NAME
    make_adapter(base_dir, lora_dir, LORA_KWARGS, SEED_LORA)
    make_adapter_reference(
        base_dir, lora_dir, tokens, targets, with_grads=True,
        description="gpt2-tiny + LoRA(r=4, alpha=12, c_attn/c_proj/c_fc) float64 reference: "
        "logits, loss, grad.<adapter key>, merged_logits (after merge_and_unload)",
    )

    rs_dir = FIXTURES / RSLORA_DIR_NAME
    make_adapter(base_dir, rs_dir, RSLORA_KWARGS, SEED_RSLORA)
    make_adapter_reference(
        base_dir, rs_dir, tokens, targets, with_grads=False,
        description="gpt2-tiny + rsLoRA(r=2, alpha=5, c_attn of layer 1) float64 reference: logits, loss",
    )

    write_readme()
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"wrote {FIXTURES} ({total} bytes)")
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            print(f"  {p.relative_to(FIXTURES)}  {p.stat().st_size}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check-model", metavar="DIR", type=Path,
                       help="compare a tapelora-written HF GPT-2 folder with transformers")
    group.add_argument("--check-adapter", nargs=2, metavar=("BASE_DIR", "ADAPTER_DIR"), type=Path,
                       help="compare a tapelora-written PEFT adapter with PEFT")
    group.add_argument("--peft-logits", nargs=2, metavar=("BASE_DIR", "ADAPTER_DIR"), type=Path,
                       help="write PEFT's logits for a tapelora-written adapter (peft_reference.safetensors)")
    group.add_argument("--self-test", action="store_true",
                       help="exercise the check modes on temporary copies of the fixtures")
    args = parser.parse_args()

    setup_determinism()
    if args.check_model:
        return check_model(args.check_model)
    if args.check_adapter:
        return check_adapter(*args.check_adapter)
    if args.peft_logits:
        return peft_logits(*args.peft_logits)
    if args.self_test:
        return self_test()
    return generate()


if __name__ == "__main__":
    sys.exit(main())
