"""The recipes' arguments (hf_quailora/scripts/): trl's ModelConfig flags resolved into one quantization, trl's
helpers build the configs, QuAILoRAConfig parsed itself next to trl's dataclasses, former flags renamed."""

import dataclasses
import warnings

import pytest
import torch
from trl import TrlParser

from hf_quailora import DynamicRankConfig, QuAILoRAConfig
from hf_quailora.scripts import (
    RENAMED_FLAGS,
    RecipeArguments,
    RecipeDataArguments,
    RecipeModelConfig,
    RecipeParser,
    RecipeQuAILoRAConfig,
    build_lora_config,
    build_quantization_config,
    check_recipe_arguments,
    load_recipe_model,
)

from testing_utils import require_bitsandbytes


def parse(*argv):
    return RecipeParser((RecipeModelConfig, RecipeArguments)).parse_args_and_config(list(argv))


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
    config = build_quantization_config(model_args)  # trl's get_quantization_config
    if quantization == "none":
        assert config is None
    else:
        assert (config.load_in_4bit, config.load_in_8bit) == (four_bit, eight_bit)
    if four_bit:
        assert config.bnb_4bit_quant_type == quantization and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_lora_flags_go_through_trls_get_peft_config():
    model_args, _ = parse("--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj", "--use_rslora")
    lora = build_lora_config(model_args)
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.lora_dropout) == (8, 8, True, 0.0)  # alpha defaults to r
    assert set(lora.target_modules) == {"q_proj", "v_proj"} and lora.task_type == "CAUSAL_LM"
    assert parse("--lora_target_modules", "q_proj,v_proj")[0].lora_target_modules == ["q_proj", "v_proj"]
    assert parse("--lora_target_modules", "q_proj")[0].lora_target_modules == ["q_proj"]  # a name, not a regex
    assert build_lora_config(parse()[0]).target_modules == "all-linear"
    assert build_lora_config(parse("--lora_alpha", "32")[0]).lora_alpha == 32


def test_double_quant_is_a_deprecated_name_of_use_bnb_nested_quant():
    with pytest.warns(FutureWarning, match="use_bnb_nested_quant"):
        model_args, _ = parse("--double_quant", "false")
    assert model_args.use_bnb_nested_quant is False
    assert not build_quantization_config(model_args).bnb_4bit_use_double_quant
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


@require_bitsandbytes
def test_load_model_builds_the_quantized_base_and_its_lora(tiny_model_path):
    from hf_quailora.quantization import model_quantization

    model_args, _ = parse("--model_name_or_path", tiny_model_path, "--load_in_4bit", "--bnb_4bit_quant_type", "fp4",
                          "--lora_r", "2", "--lora_target_modules", "q_proj")
    model, tokenizer = load_recipe_model(model_args)
    assert model_quantization(model) == "fp4" and tokenizer.pad_token is not None
    lora_params = [name for name, p in model.named_parameters() if p.requires_grad]
    assert lora_params and all("q_proj.lora_" in name for name in lora_params)


def test_quailora_config_is_parsed_itself_next_to_trls_dataclasses_without_a_conflict():
    classes = (DynamicRankConfig, RecipeModelConfig, RecipeDataArguments, RecipeArguments, RecipeQuAILoRAConfig)
    names = [field.name for cls in classes[:-1] for field in dataclasses.fields(cls)]
    quailora_names = [field.name for field in dataclasses.fields(QuAILoRAConfig)]
    assert not set(names) & set(quailora_names)  # no QuAILoRAConfig field shadows a trl/recipe one
    parser = TrlParser(classes)  # argparse raises on a conflicting flag
    *_, quailora_args = parser.parse_args_and_config(
        ["--output_dir", "unused", "--max_length", "64", "--calibration_length", "32", "--solver", "als",
         "--calibration_samples", "4", "--calibration_batch_size", "2", "--memory_budget", "8GiB"]
    )
    assert (quailora_args.calibration_length, quailora_args.solver, quailora_args.calibration_samples,
            quailora_args.calibration_batch_size, quailora_args.memory_budget_bytes) == (32, "als", 4, 2, 8 * 2**30)
    assert isinstance(quailora_args, QuAILoRAConfig)


def test_recipe_defaults_differ_from_the_library_only_in_calibration_size():
    recipe, library = RecipeQuAILoRAConfig(), QuAILoRAConfig()
    differ = {field.name for field in dataclasses.fields(QuAILoRAConfig)
              if getattr(recipe, field.name) != getattr(library, field.name)}
    assert differ == {"calibration_samples", "calibration_length"}
    assert (recipe.calibration_samples, recipe.calibration_length) == (32, 256)
    with pytest.warns(FutureWarning, match="`num_samples` is deprecated"):
        assert RecipeQuAILoRAConfig(num_samples=8).calibration_samples == 8


def test_quailora_errors_name_the_field_when_parsed():
    parser = RecipeParser((RecipeArguments, RecipeQuAILoRAConfig))
    with pytest.raises(ValueError, match=r"`calibration_batch_size` \(0\) must be a positive integer"):
        parser.parse_args_and_config(["--gram_device", "cpu", "--calibration_batch_size", "0"])
    with pytest.raises(ValueError, match="memory_budget"):
        parser.parse_args_and_config(["--memory_budget", "0"])


def test_former_quailora_flags_are_renamed_on_the_command_line_and_in_yaml(tmp_path):
    assert set(RENAMED_FLAGS.values()) <= {field.name for field in dataclasses.fields(QuAILoRAConfig)}
    parser = RecipeParser((RecipeArguments, RecipeQuAILoRAConfig))
    with pytest.warns(FutureWarning, match="`--quailora_damping` is deprecated; use `--damping`"):
        _, quailora_args = parser.parse_args_and_config(["--quailora_damping=0.01", "--quailora-solver", "als"])
    assert (quailora_args.damping, quailora_args.solver) == (0.01, "als")
    config = tmp_path / "config.yaml"
    config.write_text("quailora_gram_device: cpu\nquailora_show_progress: false\n")
    with pytest.warns(FutureWarning, match="`--quailora_gram_device` is deprecated; use `--gram_device`"):
        _, quailora_args = parser.parse_args_and_config(["--config", str(config)])
    assert (quailora_args.gram_device, quailora_args.show_progress) == ("cpu", False)
    config.write_text("quailora_solver: als\nsolver: svd\n")
    with pytest.raises(ValueError, match="both `quailora_solver` and `solver`"):
        parser.parse_args_and_config(["--config", str(config)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parser.parse_args_and_config(["--solver", "svd"])[1].solver == "svd"  # the new names: no warning


def test_the_former_module_paths_still_import():
    import hf_quailora.recipe_args as recipe_args
    import hf_quailora.scripts.sft_data as sft_data
    import hf_quailora.sft_data as old_sft_data

    assert recipe_args.RecipeModelConfig is RecipeModelConfig and recipe_args.RecipeArguments is RecipeArguments
    assert recipe_args.check_recipe_arguments is check_recipe_arguments
    assert old_sft_data.load_sft_splits is sft_data.load_sft_splits
