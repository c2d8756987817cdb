"""The recipes' arguments: trl's ModelConfig flags resolved into one quantization, trl's helpers build the configs."""

import dataclasses
import warnings

import pytest
import torch
from trl import TrlParser

from hf_quailora.recipe_args import RecipeArguments, RecipeModelConfig, check_recipe_arguments

from testing_utils import require_bitsandbytes


def parse(*argv):
    return TrlParser((RecipeModelConfig, RecipeArguments)).parse_args_and_config(list(argv))


@pytest.mark.parametrize("argv, quantization, four_bit, eight_bit", [
    ([], "nf4", True, False),  # the recipes' default: QLoRA's NF4
    (["--load_in_4bit"], "nf4", True, False),
    (["--load_in_4bit", "--bnb_4bit_quant_type", "fp4"], "fp4", True, False),
    (["--bnb_4bit_quant_type", "fp4"], "fp4", True, False),
    (["--load_in_8bit"], "int8", False, True),
    (["--quantization", "fp4"], "fp4", True, False),
    (["--quantization", "nf4", "--load_in_4bit", "--bnb_4bit_quant_type", "nf4"], "nf4", True, False),
    (["--quantization", "int8", "--load_in_8bit"], "int8", False, True),
    (["--quantization", "none"], "none", False, False),
])
def test_quantization_flags_resolve_to_one_setting(argv, quantization, four_bit, eight_bit):
    model_args, _ = parse(*argv)
    assert (model_args.quantization, model_args.load_in_4bit, model_args.load_in_8bit) == (
        quantization, four_bit, eight_bit)
    again = dataclasses.replace(model_args)  # __post_init__ runs again on resolved values: same result
    assert (again.quantization, again.load_in_4bit, again.load_in_8bit) == (quantization, four_bit, eight_bit)
    config = model_args.quantization_config()  # trl's get_quantization_config
    if quantization == "none":
        assert config is None
    else:
        assert (config.load_in_4bit, config.load_in_8bit) == (four_bit, eight_bit)
    if four_bit:
        assert config.bnb_4bit_quant_type == quantization and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_lora_flags_go_through_trls_get_peft_config():
    model_args, _ = parse("--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "--use_rslora")
    lora = model_args.lora_config()
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.lora_dropout) == (8, 8, True, 0.0)  # alpha defaults to r
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.task_type == "CAUSAL_LM"
    assert parse("--lora_target_modules", "q_proj,v_proj")[0].lora_target_modules == ["q_proj", "v_proj"]
    assert parse("--lora_target_modules", "q_proj")[0].lora_target_modules == ["q_proj"]  # a name, not a regex
    assert parse()[0].lora_config().target_modules == "all-linear"
    assert parse("--lora_alpha", "32")[0].lora_config().lora_alpha == 32


def test_double_quant_is_a_deprecated_name_of_use_bnb_nested_quant():
    with pytest.warns(FutureWarning, match="use_bnb_nested_quant"):
        model_args, _ = parse("--double_quant", "false")
    assert model_args.use_bnb_nested_quant is False
    assert not model_args.quantization_config().bnb_4bit_use_double_quant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse("--no_use_bnb_nested_quant")[0].use_bnb_nested_quant is False


@pytest.mark.parametrize("argv, match", [
    (["--load_in_4bit", "--load_in_8bit"], "`--load_in_4bit` and `--load_in_8bit` were both given"),
    (["--quantization", "none", "--load_in_8bit"], "`--quantization none` contradicts `--load_in_8bit`"),
    (["--quantization", "int8", "--bnb_4bit_quant_type", "nf4"], "`--quantization int8` contradicts"),
    (["--use_dora"], "`--use_dora` is not supported"),
    (["--lora_r", "0"], r"`--lora_r` \(0\)"),
])
def test_bad_model_flags_are_refused_when_parsed(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(*argv)


def test_shared_checks_refuse_what_a_recipe_cannot_do():
    model_args, recipe_args = parse("--use_peft", "false")
    with pytest.raises(ValueError, match="`--use_peft false`"):
        check_recipe_arguments(model_args, recipe_args)
    model_args, recipe_args = parse("--sweep_ranks", "1,2")
    check_recipe_arguments(model_args, recipe_args)  # fine for a recipe that trains
    with pytest.raises(ValueError, match="`--sweep_ranks` applies to recipes that train"):
        check_recipe_arguments(model_args, recipe_args, trains=False)
    model_args, recipe_args = parse("--quailora_gram_device", "cpu", "--calibration_batch_size", "0")
    with pytest.raises(ValueError, match=r"`--calibration_batch_size` \(0\)"):  # QuAILoRAConfig's check, our flag
        check_recipe_arguments(model_args, recipe_args)


@require_bitsandbytes
def test_load_model_builds_the_quantized_base_and_its_lora(tiny_model_path):
    from hf_quailora.quantization import model_quantization

    model_args, _ = parse("--model_name_or_path", tiny_model_path, "--load_in_4bit", "--bnb_4bit_quant_type", "fp4",
                          "--lora_r", "2", "--lora_target_modules", "q_proj")
    model, tokenizer = model_args.load_model()
    assert model_quantization(model) == "fp4" and tokenizer.pad_token is not None
    lora_params = [name for name, p in model.named_parameters() if p.requires_grad]
    assert lora_params and all("q_proj.lora_" in name for name in lora_params)
