"""Every launcher config in configs/accelerate/ is one accelerate itself accepts, with no ignored key.

accelerate's own `ClusterConfig` loads each file (unknown top-level keys raise there); nested
`fsdp_config` / `deepspeed_config` keys are copied onto `accelerate launch` arguments of the same
name, so a key that is not one of those arguments would be silently ignored — a typo that must fail
here instead. DeepSpeed itself is not installed (nor a dependency): its files are checked as data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType, constants
from accelerate.utils.dataclasses import get_module_class_from_name
from transformers import AutoModelForCausalLM, Qwen2Config

from seechat.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {
    "ddp": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "zero2": DistributedType.DEEPSPEED,
    "zero3": DistributedType.DEEPSPEED,
}


def test_the_four_strategies_are_there():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_accelerate_loads_it_for_8_gpus_on_one_node_in_bf16(path):
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == EXPECTED[path.stem]
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision, cfg.use_cpu) == (8, 1, "bf16", False)
    launch_args = {a.dest for a in launch_command_parser()._actions}
    nested = {**cfg.fsdp_config, **cfg.deepspeed_config}
    ignored = sorted(set(nested) - launch_args)
    assert not ignored, f"{path.name}: accelerate launch has no argument for {ignored}"


def test_fsdp_is_version_2_fully_sharding_qwen2_decoder_layers():
    fsdp = load_config_from_file(str(CONFIGS[[p.stem for p in CONFIGS].index("fsdp")])).fsdp_config
    assert fsdp["fsdp_version"] == 2  # the loop saves and resumes FSDP2 shards only (it refuses version 1)
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard: layers are gathered only while they run
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] in constants.FSDP_STATE_DICT_TYPE
    # the class to wrap is found in a real Qwen2 model the way accelerate's wrap policy looks it up
    lm = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert get_module_class_from_name(lm, name) is not None, name


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_configs_shard_what_their_name_says(stage):
    ds = load_config_from_file(str(CONFIGS[[p.stem for p in CONFIGS].index(f"zero{stage}")])).deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    # DeepSpeed steps and clips by its own config: it must agree with the stage-2 recipes
    for recipe in (CONFIGS[0].parents[1] / "reference").glob("stage2_*.yaml"):
        cfg = load_config(recipe)
        assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum, recipe.name
        assert ds["gradient_clipping"] == cfg.optim.grad_clip, recipe.name
