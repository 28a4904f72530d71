"""Pre-train a ViT with masked image modeling and Masked Token Optimization (MTO).

One GPU, many GPUs or CPU, through accelerate and the HF Trainer:

    # the tiny CPU preset on the embedded default data (Fashion-MNIST), a few minutes on 2 cores
    accelerate launch recipes/pretrain.py
    # another method's tiny CPU preset (recipes/configs/tiny_cpu_*.yaml, found by the model_type it names)
    accelerate launch recipes/pretrain.py --model_type simmim_mto

    # a preset plus overrides
    accelerate launch recipes/pretrain.py --config recipes/configs/vit_base_mae_mto_in1k.yaml \
        --dataset_name imagenet-1k --output_dir outputs/vit-b-mae-mto --push_to_hub

    # several processes (CPU test: torchrun --nproc_per_node 2 recipes/pretrain.py ...)
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/pretrain.py --config ...

Every flag of `ModelArguments` (hf_mto/cli.py), `DataArguments` (hf_mto/data.py), `EncoderEvalArguments`
(hf_mto/evaluation.py: `--encoder_eval` adds k-NN and linear-probe accuracy to every evaluation) and
`MTOTrainingArguments` (hf_mto/training_args.py, which extends transformers' `TrainingArguments`) can be set in the
YAML/JSON file or on the command line; the command line wins.
"""

import argparse
import logging
from pathlib import Path

import yaml

from hf_mto.analysis import ReconstructionCallback
from hf_mto.cli import ModelArguments, build_config, build_model, parse_args
from hf_mto.data import (
    DataArguments,
    PixelCollator,
    apply_transform,
    build_eval_transform,
    build_image_processor,
    load_datasets,
    skipped_images,
)
from hf_mto.evaluation import EncoderEvalArguments, EncoderEvalCallback, labelled_eval_splits
from hf_mto.methods import method_for, model_types
from hf_mto.run import evaluate, finish, setup_run, train
from hf_mto.trainer import MTOTrainer
from hf_mto.training_args import MTOTrainingArguments

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"


def tiny_presets() -> dict[str, Path]:
    """model type -> its tiny CPU preset: each `configs/tiny_cpu_*.yaml` that names a `model_type` (fine-tuning's
    names none). The presets declare their method themselves, so a new method's preset needs no entry here."""
    presets = {}
    for path in sorted(CONFIGS.glob("tiny_cpu_*.yaml")):
        model_type = yaml.safe_load(path.read_text()).get("model_type")
        if model_type is not None:
            presets[model_type] = path
    return presets


def default_config(argv: list[str]) -> Path | None:
    """The preset of a command line that names no config file: the tiny CPU preset of its `--model_type` (MAE's
    without one). None for a model type hf_mto does not know, which `ModelArguments` then reports with the known
    ones.

    Raises:
        ValueError: a known model type has no tiny preset, naming it and those that have one.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model_type", default=ModelArguments.model_type)
    model_type = parser.parse_known_args(argv)[0].model_type
    presets = tiny_presets()
    if model_type in presets:
        return presets[model_type]
    if model_type not in model_types():
        return None
    raise ValueError(
        f"model type {model_type!r} has no tiny CPU preset (a {CONFIGS}/tiny_cpu_*.yaml with 'model_type: "
        f"{model_type}'); those with one: {sorted(presets)}. Name a preset with --config FILE."
    )


def main(argv=None):
    model_args, data_args, eval_args, training_args = parse_args(
        (ModelArguments, DataArguments, EncoderEvalArguments, MTOTrainingArguments),
        argv,
        default_config=default_config,
    )
    setup_run(training_args, logger)

    config = build_config(model_args)
    model = build_model(model_args, config)
    image_processor = build_image_processor(config)
    logger.info(
        "model %s: %.2fM parameters; learning rate %.3g (total batch %d); MTO weights %s",
        model_args.model_type,
        model.num_parameters() / 1e6,
        training_args.learning_rate,
        training_args.total_train_batch_size,
        training_args.mto_weights() if training_args.use_mto else "off",
    )

    try:
        datasets = load_datasets(data_args, cache_dir=model_args.cache_dir, seed=training_args.seed)
    except (
        ValueError,
        ConnectionError,
    ) as error:  # wrong name, column or folder, or offline: the message says what to do
        raise SystemExit(f"pretrain.py: {error}") from None
    size, mean, std = image_processor.size["height"], image_processor.image_mean, image_processor.image_std
    # the method's transforms: one view per forward argument its model takes (MAE and SimMIM: pixel_values)
    method = method_for(model)
    train_dataset = apply_transform(datasets["train"], method.pretraining_transform(size, mean, std, config=config))
    eval_dataset = apply_transform(datasets["validation"], method.evaluation_transform(size, mean, std, config=config))

    trainer = MTOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=image_processor,
        data_collator=PixelCollator(image_mean=mean, image_std=std),  # normalises 8-bit views on the device
        model_card_kwargs={"data_args": data_args},  # the card in every checkpoint (and on the Hub) names the data
    )
    fsdp1 = trainer.is_fsdp_enabled and not trainer.accelerator.is_fsdp2
    if fsdp1 and (training_args.reconstruction_images > 0 or eval_args.encoder_eval):
        # Both run the model's submodules outside its forward, on the weights gathered whole (FSDP2's, see
        # hf_mto.evaluation.unsharded_model); FSDP1's flattened parameters are not gathered there.
        logger.warning(
            "FSDP version 1: reconstruction pictures and --encoder_eval are off; set fsdp_version: 2 "
            "(recipes/accelerate_configs/fsdp.yaml) to keep them"
        )
        training_args.reconstruction_images, eval_args.encoder_eval = 0, False
    if training_args.do_eval and training_args.reconstruction_images > 0 and method.reconstructs_pixels:
        ReconstructionCallback(eval_dataset, mean, std, num_images=training_args.reconstruction_images).attach(trainer)
    if eval_args.encoder_eval:
        # k-NN and linear-probe accuracy of the frozen encoder at every evaluation, logged like any metric
        encoder_transform = build_eval_transform(size, mean, std)  # one view: the frozen encoder's features
        bank, queries = labelled_eval_splits(datasets, encoder_transform, eval_args, seed=training_args.seed)
        EncoderEvalCallback.from_args(bank, queries, eval_args).attach(trainer)

    if training_args.do_train:
        train(trainer)

    if skipped_images():
        logger.warning("%d unreadable images were skipped (each named in a warning above)", len(skipped_images()))

    if training_args.do_eval:
        evaluate(trainer)

    if training_args.push_to_hub:
        # saves the model and its card first; a Hub failure is a warning (MTOTrainer.push_to_hub)
        trainer.push_to_hub(tags=["masked-image-modeling", "mto", model_args.model_type])
    else:
        trainer.create_model_card()  # the card of output_dir, now with the final evaluation

    finish(trainer)


if __name__ == "__main__":
    main()
